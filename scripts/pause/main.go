// The pod sandbox ("pause") process: holds a pod's namespaces open and exits on
// SIGTERM/SIGINT. No registry is reachable here, so containerd's sandbox image is
// built from this program (scripts/build-image) rather than pulled.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}
