// Command etcd is the etcd server, built from the published go.etcd.io/etcd/server/v3 module.
// A wrapper is needed because that module's own go.mod has replace lines, so `go install` refuses it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
