"""Discord-style voice: the gateway (WebSocket JSON opcodes) and the UDP transport with its AEAD modes."""
