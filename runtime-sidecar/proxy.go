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
	"context"
	"crypto/subtle"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

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
	if p.token == "" {
		log.Print("KUBETASK_PROXY_TOKEN is required")
		return 2
	}
	// For the preStop hook only, which runs long after the server started: a copy racing the
	// server's container at start does no harm here (it does not run the runtime).
	if err := install(dir); err != nil {
		log.Printf("cannot install: %v", err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /invoke", p.invoke)
	mux.HandleFunc("GET /ready", p.ready)
	mux.HandleFunc("POST /drain", p.drain)
	server := &http.Server{Addr: ":" + envOr("KUBETASK_PROXY_PORT", "8079"), Handler: mux}
	stops := make(chan os.Signal, 1)
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stops // after the function's container has stopped: nothing is in flight any more
		p.startDraining()
		p.waitIdle(time.Now().Add(10 * time.Second))
		_ = server.Shutdown(context.Background())
	}()
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
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
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.inflight--
		p.idle.Broadcast()
		p.mu.Unlock()
	}()
	// The dispatcher abandoning the request (stop, timeout) closes its connection, which
	// cancels r's context and with it the request to the function.
	req, _ := http.NewRequestWithContext(r.Context(), http.MethodPost, p.app+p.invokePath, r.Body)
	for _, h := range []string{"Content-Type", "X-Kubetask-Task-Id", "X-Kubetask-Attempt", "X-Kubetask-Account"} {
		if v := r.Header.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	req.ContentLength = r.ContentLength
	resp, err := p.client.Do(req)
	if err != nil {
		http.Error(w, fmt.Sprintf("the function's server did not answer: %v", err), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
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
