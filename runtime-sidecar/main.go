// kt-runtime is kubetask's agent in executor pods. `install` puts it into the pod's shared
// volume, for the function's container. In a Job's pod, `sidecar` runs beside the
// function's container and `entry` is that container's command; in a warm server function's pod,
// `proxy` takes the dispatchers' invocations, `serve` runs the function's server and gives
// its output to the proxy, and `drain` is the server container's preStop hook. One static binary, so it runs in any image.
package main

import (
	"fmt"
	"os"
)

func main() {
	dir := os.Getenv("KUBETASK_RUNTIME_DIR")
	if dir == "" {
		dir = "/kt"
	}
	if len(os.Args) >= 2 {
		switch os.Args[1] {
		case "sidecar":
			os.Exit(runSidecar(dir))
		case "proxy":
			os.Exit(runProxy(dir))
		case "install":
			if err := install(dir); err != nil {
				fmt.Fprintf(os.Stderr, "kt-runtime install: %v\n", err)
				os.Exit(1)
			}
			os.Exit(0)
		case "serve":
			argv := os.Args[2:]
			if len(argv) > 0 && argv[0] == "--" {
				argv = argv[1:]
			}
			os.Exit(runServe(dir, argv))
		case "drain":
			os.Exit(runDrain())
		case "entry":
			argv := os.Args[2:]
			if len(argv) > 0 && argv[0] == "--" {
				argv = argv[1:]
			}
			os.Exit(runEntry(dir, argv))
		}
	}
	fmt.Fprintln(os.Stderr, "usage: kt-runtime install | sidecar | entry -- COMMAND... | proxy | serve -- COMMAND... | drain")
	os.Exit(2)
}
