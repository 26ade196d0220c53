package main

// `kt-runtime proxy` is the sidecar of a warm `server` function's pod (the role of Knative's
// queue-proxy or the OpenFaaS watchdog). Dispatchers invoke it; it passes each invocation to the
// function's own HTTP server on localhost, holding at most `concurrency` at once and answering
// 429 beyond that, which a dispatcher takes as "busy" (the task goes back to its queue, no
// attempt spent). It reports readiness from the function's own readiness path.
//
// Scale-down never cuts an invocation short: the function's container has a preStop hook,
// `kt-runtime drain`, which the kubelet runs before it signals the server. Draining answers
// new invocations 503 (busy, again no attempt spent: another pod takes them), takes the pod out
// of readiness and returns once the invocations in flight have ended.

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const proxySocket = "proxy.sock" // where `serve` gives the server's output

// invocation is one in flight: the output lines written while it runs, for its answer.
type invocation struct {
	out     chan frame
	dropped int
}

type proxy struct {
	token       string
	app         string // http://127.0.0.1:PORT
	invokePath  string
	readyPath   string
	concurrency int
	client      *http.Client

	mu       sync.Mutex
	inflight int
	draining bool
	idle     *sync.Cond // signalled when inflight drops
	running  map[*invocation]struct{}
	serve    net.Conn                 // `serve`'s connection, for syncs
	syncs    map[uint64]chan struct{} // syncs asked for and not yet answered
	lastSync uint64
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func runProxy(dir string) int {
	concurrency, err := strconv.Atoi(envOr("KUBETASK_CONCURRENCY", "1"))
	if err != nil || concurrency < 1 {
		log.Printf("KUBETASK_CONCURRENCY must be a positive number")
		return 2
	}
	p := &proxy{
		token:       os.Getenv("KUBETASK_PROXY_TOKEN"),
		app:         "http://127.0.0.1:" + envOr("KUBETASK_APP_PORT", "8080"),
		invokePath:  envOr("KUBETASK_INVOKE_PATH", "/invoke"),
		readyPath:   envOr("KUBETASK_READINESS_PATH", "/healthz"),
		concurrency: concurrency,
		client: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: concurrency,
			DisableCompression:  true,
		}},
	}
	p.idle = sync.NewCond(&p.mu)
	p.running = map[*invocation]struct{}{}
	p.syncs = map[uint64]chan struct{}{}
	if p.token == "" {
		log.Print("KUBETASK_PROXY_TOKEN is required")
		return 2
	}
	sock := filepath.Join(dir, proxySocket)
	_ = os.Remove(sock)
	output, err := net.Listen("unix", sock)
	if err != nil {
		log.Printf("cannot listen on %s: %v", sock, err)
		return 1
	}
	_ = os.Chmod(sock, 0o666) // the server's container may run as any user
	go p.takeOutput(output)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /invoke", p.invoke)
	mux.HandleFunc("GET /ready", p.ready)
	mux.HandleFunc("POST /drain", p.drain)
	// A connection that has not sent its request's head within 10 s is closed: one that sent
	// nothing was kept for good (`peers.go`).
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", ":"+envOr("KUBETASK_PROXY_PORT", "8079"))
	if err != nil {
		log.Print(err)
		return 1
	}
	stops := make(chan os.Signal, 1)
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stops // after the function's container has stopped: nothing is in flight any more
		p.startDraining()
		p.waitIdle(time.Now().Add(10 * time.Second))
		_ = server.Shutdown(context.Background())
	}()
	if err := server.Serve(limitPeers(ln, concurrency+peerSpare)); err != nil && err != http.ErrServerClosed {
		log.Print(err)
		return 1
	}
	return 0
}

func (p *proxy) invoke(w http.ResponseWriter, r *http.Request) {
	given := []byte(r.Header.Get("Authorization"))
	if subtle.ConstantTimeCompare(given, []byte("Bearer "+p.token)) != 1 {
		http.Error(w, "not a dispatcher of this function", http.StatusUnauthorized)
		return
	}
	p.mu.Lock()
	switch {
	case p.draining:
		p.mu.Unlock()
		http.Error(w, "draining", http.StatusServiceUnavailable)
		return
	case p.inflight >= p.concurrency:
		p.mu.Unlock()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "busy", http.StatusTooManyRequests)
		return
	}
	p.inflight++
	inv := &invocation{out: make(chan frame, 1024)}
	p.running[inv] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.inflight--
		delete(p.running, inv)
		p.idle.Broadcast()
		p.mu.Unlock()
	}()
	// Read before anything is written: once the answer's headers are out, an HTTP/1 request's
	// body may no longer be read ("invalid Read on closed Body", seen under load).
	payload, err := io.ReadAll(io.LimitReader(r.Body, maxFrame))
	if err != nil {
		http.Error(w, "cannot read the invocation", http.StatusBadRequest)
		return
	}
	// Accepted: the answer is frames from here on — the server's output while this runs, then
	// 'A' with the server's status and body (or 502 when the server could not be reached).
	w.Header().Set("Content-Type", "application/x-kubetask-frames")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	answered := make(chan []byte, 1)
	go func() { answered <- p.forward(r, payload) }()
	for {
		select {
		case f := <-inv.out:
			_ = writeFrame(w, f.kind, f.data)
			if flusher != nil {
				flusher.Flush()
			}
		case answer := <-answered:
			p.sync()
			for len(inv.out) > 0 {
				f := <-inv.out
				_ = writeFrame(w, f.kind, f.data)
			}
			p.mu.Lock()
			dropped := inv.dropped
			p.mu.Unlock()
			if dropped > 0 {
				note := fmt.Sprintf("kt-runtime: %d lines of output not kept (too many at once)\n", dropped)
				_ = writeFrame(w, frameStderr, []byte(note))
			}
			_ = writeFrame(w, frameAnswer, answer)
			return
		}
	}
}

// forward passes the invocation to the server: its status (4 bytes) and body.
func (p *proxy) forward(r *http.Request, payload []byte) []byte {
	// The dispatcher abandoning the request (stop, timeout) closes its connection, which
	// cancels r's context and with it the request to the function.
	body := bytes.NewReader(payload)
	req, _ := http.NewRequestWithContext(r.Context(), http.MethodPost, p.app+p.invokePath, body)
	for _, h := range []string{"Content-Type", "X-Kubetask-Task-Id", "X-Kubetask-Attempt", "X-Kubetask-Account"} {
		if v := r.Header.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return append(exitFrame(http.StatusBadGateway), fmt.Sprintf("the function's server did not answer: %v", err)...)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, maxFrame-4))
	return append(exitFrame(resp.StatusCode), answer...)
}

// sync returns once `serve` has passed on all the server wrote before now: an invocation's
// answer has come, and what the server printed before answering is that invocation's. Without
// it the answer, on its own connection, often arrived before the last line did.
func (p *proxy) sync() {
	p.mu.Lock()
	if p.serve == nil {
		p.mu.Unlock()
		return
	}
	p.lastSync++
	id, done := p.lastSync, make(chan struct{})
	p.syncs[id] = done
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], id)
	err := writeFrame(p.serve, frameSync, b[:])
	p.mu.Unlock()
	if err == nil {
		select {
		case <-done:
		case <-time.After(100 * time.Millisecond):
		}
	}
	p.mu.Lock()
	delete(p.syncs, id)
	p.mu.Unlock()
}

// takeOutput reads what `serve` sends: each line goes to every invocation in flight.
func (p *proxy) takeOutput(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.serve = conn
		p.mu.Unlock()
		go func() {
			defer conn.Close()
			for {
				f, err := readFrame(conn)
				if err != nil {
					return
				}
				p.mu.Lock()
				if f.kind == frameSync && len(f.data) == 8 {
					id := binary.BigEndian.Uint64(f.data)
					if done, ok := p.syncs[id]; ok {
						delete(p.syncs, id)
						close(done)
					}
					p.mu.Unlock()
					continue
				}
				// Output only: the socket is open to the server's container, and an answer
				// frame from there would read as some invocation's answer.
				if f.kind != frameStdout && f.kind != frameStderr {
					p.mu.Unlock()
					continue
				}
				for inv := range p.running {
					select {
					case inv.out <- f:
					default:
						inv.dropped++
					}
				}
				p.mu.Unlock()
			}
		}()
	}
}

func (p *proxy) ready(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	draining := p.draining
	p.mu.Unlock()
	if draining {
		http.Error(w, "draining", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.app+p.readyPath, nil)
	resp, err := p.client.Do(req)
	if err != nil {
		http.Error(w, "the function's server is not ready", http.StatusServiceUnavailable)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		http.Error(w, "the function's server is not ready", http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (p *proxy) startDraining() {
	p.mu.Lock()
	p.draining = true
	p.mu.Unlock()
}

// waitIdle returns once nothing is in flight, or at the deadline.
func (p *proxy) waitIdle(deadline time.Time) bool {
	timer := time.AfterFunc(time.Until(deadline), func() {
		p.mu.Lock()
		p.idle.Broadcast()
		p.mu.Unlock()
	})
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.inflight > 0 && time.Now().Before(deadline) {
		p.idle.Wait()
	}
	return p.inflight == 0
}

// drain is asked for by the preStop hook, from inside the pod only.
func (p *proxy) drain(w http.ResponseWriter, r *http.Request) {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		http.Error(w, "only from inside the pod", http.StatusForbidden)
		return
	}
	p.startDraining()
	if !p.waitIdle(time.Now().Add(24 * time.Hour)) { // the pod's grace period ends it first
		http.Error(w, "still busy", http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// runDrain is the function container's preStop hook.
func runDrain() int {
	port := envOr("KUBETASK_PROXY_PORT", "8079")
	resp, err := http.Post("http://127.0.0.1:"+port+"/drain", "text/plain", nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kt-runtime drain: %v\n", err)
		return 1
	}
	resp.Body.Close()
	return 0
}
