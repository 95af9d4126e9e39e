# Quick start: `make serve` runs the server with its embedded demo configuration;
# `make test` runs the whole test suite. Both install what they need into .venv first.
.PHONY: serve test bench setup clean

setup:
	scripts/bootstrap.sh

serve: setup
	.venv/bin/fastsfu serve

test:
	scripts/test.sh

bench: setup
	.venv/bin/python benchmarks/run.py

clean:
	rm -rf .venv build dist benchmarks/.build src/fastsfu/*.so src/fastsfu/_rtp.c
