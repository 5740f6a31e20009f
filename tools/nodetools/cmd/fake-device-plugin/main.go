// Command fake-device-plugin advertises fake NVIDIA GPUs to the kubelet over the device-plugin API (v1beta1).
//
// It stands in for NVIDIA's k8s-device-plugin on the local cluster's real node: the node gets
// `nvidia.com/gpu: <count>` allocatable, and Allocate sets NVIDIA_VISIBLE_DEVICES to the allocated device IDs,
// as NVIDIA's plugin does with its default envvar strategy. There is no GPU behind it.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

// ListAndWatch sends the devices once, all healthy, then holds the stream open until the kubelet goes away.
func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (p *plugin) Allocate(_ context.Context, request *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	response := &pluginapi.AllocateResponse{}
	for _, container := range request.ContainerRequests {
		ids := container.DevicesIds
		log.Printf("allocate %s", strings.Join(ids, ","))
		response.ContainerResponses = append(response.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(ids, ",")},
		})
	}
	return response, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

// serve listens on the plugin socket and registers with the kubelet; it returns the server to stop on re-registration.
func serve(p *plugin, dir, socketName, resource string) (*grpc.Server, error) {
	socket := filepath.Join(dir, socketName)
	_ = os.Remove(socket)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", socket, err)
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() { _ = server.Serve(listener) }()

	connection, err := grpc.NewClient("unix://"+filepath.Join(dir, "kubelet.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		server.Stop()
		return nil, err
	}
	defer func() { _ = connection.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(connection).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     socketName,
		ResourceName: resource,
		Options:      &pluginapi.DevicePluginOptions{},
	})
	if err != nil {
		server.Stop()
		return nil, fmt.Errorf("register with the kubelet: %w", err)
	}
	return server, nil
}

// socketID identifies one incarnation of the kubelet's socket file.
type socketID struct {
	inode    uint64
	changeNs int64
}

// kubeletSocketID: a restarted kubelet recreates its socket and forgets every plugin, so a changed ID means
// "register again", as NVIDIA's plugin does. The inode alone is not enough: a file deleted and created again at
// once often gets the same inode number back; its change time differs.
func kubeletSocketID(dir string) socketID {
	info, err := os.Stat(filepath.Join(dir, "kubelet.sock"))
	if err != nil {
		return socketID{}
	}
	stat, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return socketID{}
	}
	return socketID{inode: stat.Ino, changeNs: stat.Ctim.Nano()}
}

func main() {
	dir := flag.String("dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin directory")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name to advertise")
	count := flag.Int("count", 8, "number of devices")
	prefix := flag.String("id-prefix", "GPU-fake-", "device ID prefix")
	flag.Parse()

	p := &plugin{}
	for index := 0; index < *count; index++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("%s%d", *prefix, index), Health: pluginapi.Healthy})
	}
	socketName := "gpuaas-fake-" + strings.NewReplacer("/", "-", ".", "-").Replace(*resource) + ".sock"

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	var server *grpc.Server
	var registeredWith socketID
	ticker := time.NewTicker(500 * time.Millisecond)
	defer ticker.Stop()
	for {
		if current := kubeletSocketID(*dir); current != (socketID{}) && current != registeredWith {
			if server != nil {
				server.Stop()
				server = nil
			}
			next, err := serve(p, *dir, socketName, *resource)
			if err != nil {
				log.Printf("%v; retrying", err)
			} else {
				server, registeredWith = next, current
				log.Printf("registered %s x%d with the kubelet", *resource, *count)
			}
		}
		select {
		case <-stop:
			if server != nil {
				server.Stop()
			}
			_ = os.Remove(filepath.Join(*dir, socketName))
			return
		case <-ticker.C:
		}
	}
}
