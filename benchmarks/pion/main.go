// Command pion-forwarder is a peer in fastsfu's loopback benchmark: a bare SRTP voice forwarder
// built on pion/srtp v2 and pion/rtp, the building blocks LiveKit forwards with.
//
// It takes the same JSON config as the C baseline (benchmarks/benchconfig.py) and does the same
// per-packet work: for every participant socket, read a packet, drop it unless SSRC and payload
// type are the participant's, decrypt it once (SRTP, RFC 3711 §3.3; AEAD GCM, RFC 7714), then for
// every other member of the room copy it, set the consumer's SSRC and payload type, move the
// one-byte header extension (RFC 8285 §4.2) from the publisher's ID to the consumer's, encrypt it
// with the receiver's outbound context and send it from the receiver's socket. RTCP from a
// participant (RFC 5761 mux) is authenticated and decrypted (SRTCP, RFC 3711 §3.4) and counted,
// never forwarded.
//
// Go style, as LiveKit does it: one goroutine reads each socket and fans out; the receiver's
// outbound context is shared by the goroutines of every sender, so a mutex guards it. Sends are
// one WriteTo per packet (no sendmmsg), as pion's transports do.
//
// Usage: pion-forwarder CONFIG. Prints READY once every socket is bound, forwards until
// SIGTERM/SIGINT or EOF on stdin, then prints one JSON line of counters.
package main

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	"github.com/pion/srtp/v2"
)

const (
	maxPacket  = 1500
	rtpHeader  = 12
	maxExtHits = 8
	// SRTP replay window of the inbound contexts; libsrtp's default is 128 packets.
	replayWindow = 128
)

type participantConfig struct {
	ID      int    `json:"id"`
	Room    int    `json:"room"`
	SutPort int    `json:"sut_port"`
	GenPort int    `json:"gen_port"`
	SSRC    uint32 `json:"ssrc"`
	PT      uint8  `json:"pt"`
	ExtID   uint8  `json:"ext_id"`
	KeyUp   string `json:"key_up"`
	KeyDown string `json:"key_down"`
}

type consumerConfig struct {
	Receiver int    `json:"receiver"`
	Sender   int    `json:"sender"`
	SSRC     uint32 `json:"ssrc"`
}

type config struct {
	Suite         string              `json:"suite"`
	Participants  []participantConfig `json:"participants"`
	ConsumerPT    uint8               `json:"consumer_pt"`
	ConsumerExtID uint8               `json:"consumer_ext_id"`
	Consumers     []consumerConfig    `json:"consumers"`
}

type fan struct {
	receiver int
	ssrc     uint32
}

type participant struct {
	cfg  participantConfig
	conn *net.UDPConn
	dst  netip.AddrPort
	up   *srtp.Context // inbound: used only by this participant's reader goroutine
	mu   sync.Mutex    // guards down, shared by every sender's goroutine
	down *srtp.Context
	fans []fan
}

type counters struct {
	Received         uint64 `json:"received"`
	Forwarded        uint64 `json:"forwarded"`
	DecryptFailures  uint64 `json:"decrypt_failures"`
	SendFailures     uint64 `json:"send_failures"`
	ProtectFailures  uint64 `json:"protect_failures"`
	DroppedMalformed uint64 `json:"dropped_malformed"`
	DroppedSSRC      uint64 `json:"dropped_ssrc"`
	DroppedPT        uint64 `json:"dropped_pt"`
	RTCPReceived     uint64 `json:"rtcp_received"`
	RTCPFailures     uint64 `json:"rtcp_failures"`
	OK               bool   `json:"ok"`
}

type forwarder struct {
	cfg   config
	parts []*participant
	c     counters
}

var profiles = map[string]srtp.ProtectionProfile{
	"AES_CM_128_HMAC_SHA1_80": srtp.ProtectionProfileAes128CmHmacSha1_80,
	"AEAD_AES_128_GCM":        srtp.ProtectionProfileAeadAes128Gcm,
}

// newContext splits a hex master key || master salt (RFC 3711 §8.2) as the profile wants.
func newContext(suite, keyHex string, opts ...srtp.ContextOption) (*srtp.Context, error) {
	profile, ok := profiles[suite]
	if !ok {
		return nil, fmt.Errorf("suite %q is not an SRTP suite pion-forwarder supports", suite)
	}
	key, err := hex.DecodeString(keyHex)
	if err != nil {
		return nil, err
	}
	const keyLen = 16 // both profiles use AES-128
	if len(key) <= keyLen {
		return nil, fmt.Errorf("master key and salt too short (%d bytes)", len(key))
	}
	return srtp.CreateContext(key[:keyLen], key[keyLen:], profile, opts...)
}

func newForwarder(cfg config) (*forwarder, error) {
	f := &forwarder{cfg: cfg}
	for i, pc := range cfg.Participants {
		if pc.ID != i {
			return nil, errors.New("participant ids must be 0..n-1 in order")
		}
		up, err := newContext(cfg.Suite, pc.KeyUp, srtp.SRTPReplayProtection(replayWindow))
		if err != nil {
			return nil, fmt.Errorf("participant %d: %w", i, err)
		}
		down, err := newContext(cfg.Suite, pc.KeyDown)
		if err != nil {
			return nil, fmt.Errorf("participant %d: %w", i, err)
		}
		f.parts = append(f.parts, &participant{
			cfg:  pc,
			dst:  netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(pc.GenPort)),
			up:   up,
			down: down,
		})
	}
	for i, c := range cfg.Consumers {
		if c.Receiver < 0 || c.Receiver >= len(f.parts) || c.Sender < 0 || c.Sender >= len(f.parts) {
			return nil, fmt.Errorf("consumer %d: participant index out of range", i)
		}
		s := f.parts[c.Sender]
		s.fans = append(s.fans, fan{receiver: c.Receiver, ssrc: c.SSRC})
	}
	for _, p := range f.parts {
		addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p.cfg.SutPort}
		conn, err := net.ListenUDP("udp4", addr)
		if err != nil {
			f.close()
			return nil, err
		}
		p.conn = conn
	}
	return f, nil
}

func (f *forwarder) close() {
	for _, p := range f.parts {
		if p.conn != nil {
			p.conn.Close()
		}
	}
}

// extOffsets finds the one-byte header extension elements (RFC 8285 §4.2) with ID id; returns
// how many it found, or -1 if the header is malformed.
func extOffsets(b []byte, id uint8, offs *[maxExtHits]int) int {
	cc := int(b[0] & 0x0f)
	off := rtpHeader + 4*cc
	if off > len(b) {
		return -1
	}
	if b[0]&0x10 == 0 {
		return 0
	}
	if off+4 > len(b) {
		return -1
	}
	end := off + 4 + 4*(int(b[off+2])<<8|int(b[off+3]))
	if end > len(b) {
		return -1
	}
	if b[off] != 0xBE || b[off+1] != 0xDE {
		return 0 // two-byte form: nothing to rewrite
	}
	n := 0
	for i := off + 4; i < end; {
		h := b[i]
		if h == 0 { // padding
			i++
			continue
		}
		eid, l := h>>4, int(h&0x0f)+1
		if eid == 15 {
			break // reserved ID: stop parsing (RFC 8285 §4.2)
		}
		if i+1+l > end {
			return -1
		}
		if eid == id && n < maxExtHits {
			offs[n] = i
			n++
		}
		i += 1 + l
	}
	return n
}

// serve reads one participant's socket until it is closed and fans every packet out.
func (f *forwarder) serve(s *participant, wg *sync.WaitGroup) {
	defer wg.Done()
	in := make([]byte, maxPacket)
	plain := make([]byte, maxPacket)
	work := make([]byte, maxPacket)
	enc := make([]byte, maxPacket+64)
	var hdrIn, hdrOut rtp.Header
	var hdrRTCP rtcp.Header
	var offs [maxExtHits]int
	ptOut, extOut := f.cfg.ConsumerPT&0x7f, f.cfg.ConsumerExtID
	for {
		n, err := s.conn.Read(in)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		atomic.AddUint64(&f.c.Received, 1)
		b := in[:n]
		if n < rtpHeader || b[0]&0xC0 != 0x80 {
			atomic.AddUint64(&f.c.DroppedMalformed, 1)
			continue
		}
		if b[1] >= 192 && b[1] <= 223 { // RTCP (RFC 5761 §4)
			if _, err := s.up.DecryptRTCP(plain, b, &hdrRTCP); err != nil {
				atomic.AddUint64(&f.c.RTCPFailures, 1)
			} else {
				atomic.AddUint64(&f.c.RTCPReceived, 1)
			}
			continue
		}
		if uint32(b[8])<<24|uint32(b[9])<<16|uint32(b[10])<<8|uint32(b[11]) != s.cfg.SSRC {
			atomic.AddUint64(&f.c.DroppedSSRC, 1)
			continue
		}
		// The header is in clear: drop what would not be forwarded before decrypting it.
		if b[1]&0x7f != s.cfg.PT {
			atomic.AddUint64(&f.c.DroppedPT, 1)
			continue
		}
		dec, err := s.up.DecryptRTP(plain, b, &hdrIn)
		if err != nil {
			atomic.AddUint64(&f.c.DecryptFailures, 1)
			continue
		}
		nOffs := extOffsets(dec, s.cfg.ExtID, &offs)
		if nOffs < 0 {
			atomic.AddUint64(&f.c.DroppedMalformed, 1)
			continue
		}
		for _, fo := range s.fans {
			q := f.parts[fo.receiver]
			o := work[:len(dec)]
			copy(o, dec)
			o[1] = o[1]&0x80 | ptOut // keep the marker bit
			o[8], o[9], o[10], o[11] = byte(fo.ssrc>>24), byte(fo.ssrc>>16), byte(fo.ssrc>>8), byte(fo.ssrc)
			for k := 0; k < nOffs; k++ {
				o[offs[k]] = extOut<<4 | o[offs[k]]&0x0f
			}
			q.mu.Lock()
			out, err := q.down.EncryptRTP(enc, o, &hdrOut)
			q.mu.Unlock()
			if err != nil {
				atomic.AddUint64(&f.c.ProtectFailures, 1)
				continue
			}
			if _, err := q.conn.WriteToUDPAddrPort(out, q.dst); err != nil {
				atomic.AddUint64(&f.c.SendFailures, 1)
				continue
			}
			atomic.AddUint64(&f.c.Forwarded, 1)
		}
	}
}

func run() int {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: pion-forwarder CONFIG")
		return 2
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "pion-forwarder:", err)
		return 2
	}
	var cfg config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "pion-forwarder: config:", err)
		return 2
	}
	if _, ok := profiles[cfg.Suite]; !ok {
		fmt.Printf("pion-forwarder: no %s mode (SRTP suites only)\n", cfg.Suite)
		return 2
	}
	f, err := newForwarder(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pion-forwarder:", err)
		return 1
	}
	var wg sync.WaitGroup
	for _, p := range f.parts {
		wg.Add(1)
		go f.serve(p, &wg)
	}
	stop := make(chan struct{}, 2)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; stop <- struct{}{} }()
	if st, err := os.Stdin.Stat(); err == nil && st.Mode()&os.ModeNamedPipe != 0 {
		// EOF on a stdin pipe: the orchestrator is gone, so stop rather than linger.
		go func() {
			buf := make([]byte, 4096)
			for {
				if _, err := os.Stdin.Read(buf); err != nil {
					stop <- struct{}{}
					return
				}
			}
		}()
	}
	fmt.Println("READY")
	<-stop
	f.close()
	wg.Wait()
	c := counters{
		Received:         atomic.LoadUint64(&f.c.Received),
		Forwarded:        atomic.LoadUint64(&f.c.Forwarded),
		DecryptFailures:  atomic.LoadUint64(&f.c.DecryptFailures),
		SendFailures:     atomic.LoadUint64(&f.c.SendFailures),
		ProtectFailures:  atomic.LoadUint64(&f.c.ProtectFailures),
		DroppedMalformed: atomic.LoadUint64(&f.c.DroppedMalformed),
		DroppedSSRC:      atomic.LoadUint64(&f.c.DroppedSSRC),
		DroppedPT:        atomic.LoadUint64(&f.c.DroppedPT),
		RTCPReceived:     atomic.LoadUint64(&f.c.RTCPReceived),
		RTCPFailures:     atomic.LoadUint64(&f.c.RTCPFailures),
		OK:               true,
	}
	out, _ := json.Marshal(c)
	fmt.Println(string(out))
	return 0
}

func main() { os.Exit(run()) }
