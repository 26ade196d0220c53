package main

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
)

// forwardStops passes stop signals to cmd's process group (started with Setpgid) until the
// returned function is called; onStop, if any, is told of each first.
func forwardStops(cmd *exec.Cmd, stops <-chan os.Signal, onStop func()) (done func()) {
	ended := make(chan struct{})
	go func() {
		for {
			select {
			case sig := <-stops:
				if onStop != nil {
					onStop()
				}
				_ = syscall.Kill(-cmd.Process.Pid, sig.(syscall.Signal))
			case <-ended:
				return
			}
		}
	}()
	return func() { close(ended) }
}

// exitCode is a finished command's code as a shell reports it: 128 + the signal that killed it.
func exitCode(err error) int {
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit):
		if status, ok := exit.Sys().(syscall.WaitStatus); ok && status.Signaled() {
			return 128 + int(status.Signal())
		}
		return exit.ExitCode()
	default:
		return 126
	}
}
