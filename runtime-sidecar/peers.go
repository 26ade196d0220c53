package main

// A warm pod's proxy port is open to every pod of the cluster (the account's NetworkPolicy
// selects the port, not who may come: dispatchers run in the platform's namespace and their
// addresses are not known in advance). Go's server keeps a connection for as long as its peer
// likes once it has sent a request, so another tenant's pod holding connections without end
// would have spent this sidecar's memory and made the function unreachable. One address holds
// at most `concurrency` + peerSpare connections (a dispatcher needs one per invocation in
// flight, the kubelet one for a probe); past them a new one is closed before it is read.

import (
	"log"
	"net"
	"sync"
)

const peerSpare = 16

type peerLimitListener struct {
	net.Listener
	perPeer int

	mu     sync.Mutex
	held   map[string]int
	warned map[string]bool
}

func limitPeers(ln net.Listener, perPeer int) net.Listener {
	return &peerLimitListener{Listener: ln, perPeer: perPeer, held: map[string]int{}, warned: map[string]bool{}}
}

func (l *peerLimitListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		host, _, err := net.SplitHostPort(conn.RemoteAddr().String())
		if err != nil {
			host = conn.RemoteAddr().String()
		}
		l.mu.Lock()
		if l.held[host] >= l.perPeer {
			if !l.warned[host] {
				l.warned[host] = true
				log.Printf("%s holds %d connections; closing its new ones", host, l.perPeer)
			}
			l.mu.Unlock()
			conn.Close()
			continue
		}
		l.held[host]++
		l.mu.Unlock()
		return &peerConn{Conn: conn, listener: l, host: host}, nil
	}
}

func (l *peerLimitListener) release(host string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held[host]--; l.held[host] <= 0 {
		delete(l.held, host)
		delete(l.warned, host)
	}
}

type peerConn struct {
	net.Conn
	listener *peerLimitListener
	host     string
	once     sync.Once
}

func (c *peerConn) Close() error {
	c.once.Do(func() { c.listener.release(c.host) })
	return c.Conn.Close()
}
