package main

// `kt-runtime init -- COMMAND...` is a warm server's container command: a minimal init. As the
// container's PID 1, a server that never installed a SIGTERM handler would ignore the kubelet's
// SIGTERM (the kernel drops default-action signals to PID 1) and hold its pod for the whole
// grace period. Here the server runs as a child in its own process group, which gets the stop
// signals, and its exit code is the container's.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
)

func runInit(argv []string) int {
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "kt-runtime init: no command")
		return exitNoSidecar
	}
	stops := make(chan os.Signal, 2)
	signal.Notify(stops, syscall.SIGTERM, syscall.SIGINT)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "kt-runtime: cannot run %q: %v\n", argv[0], err)
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return exitNotFound
		}
		return 126
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case sig := <-stops:
				_ = syscall.Kill(-cmd.Process.Pid, sig.(syscall.Signal))
			case <-done:
				return
			}
		}
	}()
	err := cmd.Wait()
	close(done)
	return exitCode(err)
}
