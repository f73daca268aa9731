// ttrpc-interop runs the reference Go ttrpc implementation (github.com/containerd/ttrpc, pinned in
// go.mod) against peapod's C++ ttrpc, in both directions:
//
//	ttrpc-interop serve -socket PATH    serve peapod.test.Echo until stdin closes or -lifetime ends
//	ttrpc-interop client -socket PATH   run every case against a server, print PASS/FAIL lines
//
// Payloads are protobuf well-known wrapper types so no code generation is needed.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	service  = "peapod.test.Echo"
	maxFrame = 4 << 20
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc-interop serve|client -socket PATH")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path")
	lifetime := fs.Duration("lifetime", 2*time.Minute, "serve: exit after this long even if nobody stops us")
	_ = fs.Parse(os.Args[2:])
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "-socket is required")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		if err := serve(*socket, *lifetime); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
	case "client":
		if !runClient(*socket) {
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", os.Args[1])
		os.Exit(2)
	}
}

// ---- server ----

type echoServer struct {
	mu   sync.Mutex
	held []chan string
}

func (s *echoServer) methods() map[string]ttrpc.Method {
	return map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req wrapperspb.BytesValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &req, nil
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req wrapperspb.StringValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return nil, status.Errorf(codes.FailedPrecondition, "failing on purpose: %s", req.Value)
		},
		"Metadata": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			md, _ := ttrpc.GetMetadata(ctx)
			return wrapperspb.String(formatMD(md)), nil
		},
		"Big": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req wrapperspb.UInt64Value
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return wrapperspb.Bytes(bytes.Repeat([]byte("b"), int(req.Value))), nil
		},
		"Hold": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req wrapperspb.StringValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			ch := make(chan string, 1)
			s.mu.Lock()
			s.held = append(s.held, ch)
			s.mu.Unlock()
			select {
			case v := <-ch:
				return wrapperspb.String(v + " " + req.Value), nil
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
		},
		"Release": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			s.mu.Lock()
			held := s.held
			s.held = nil
			s.mu.Unlock()
			for _, ch := range held {
				ch <- "released"
			}
			return wrapperspb.String("ok"), nil
		},
	}
}

// formatMD renders metadata as "k=v;" pairs with keys sorted and values in order.
func formatMD(md ttrpc.MD) string {
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		for _, v := range md[k] {
			fmt.Fprintf(&b, "%s=%s;", k, v)
		}
	}
	return b.String()
}

func serve(socket string, lifetime time.Duration) error {
	_ = os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	srv.Register(service, (&echoServer{}).methods())
	// Stop when the parent closes our stdin, or after lifetime: never outlive the test.
	go func() {
		done := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(done) }()
		select {
		case <-done:
		case <-time.After(lifetime):
		}
		_ = srv.Close()
		_ = os.Remove(socket)
		os.Exit(0)
	}()
	fmt.Println("READY")
	err = srv.Serve(context.Background(), l)
	if errors.Is(err, ttrpc.ErrServerClosed) {
		return nil
	}
	return err
}

// ---- client ----

type result struct {
	name string
	err  error
}

func runClient(socket string) bool {
	cases := []struct {
		name string
		fn   func(socket string) error
	}{
		{"unary", caseUnary},
		{"concurrent", caseConcurrent},
		{"outliving", caseOutliving},
		{"metadata", caseMetadata},
		{"error-status", caseErrorStatus},
		{"unknown-method", caseUnknownMethod},
		{"deadline", caseDeadline},
		{"oversize-request-refused-locally", caseOversizeRequest},
		{"oversize-response-refused-by-server", caseOversizeResponse},
		{"oversize-raw-frame-rejected-by-server", caseRawOversizeFrame},
	}
	ok := true
	passed, failed := 0, 0
	for _, c := range cases {
		if err := c.fn(socket); err != nil {
			fmt.Printf("FAIL %s: %v\n", c.name, err)
			ok = false
			failed++
		} else {
			fmt.Printf("PASS %s\n", c.name)
			passed++
		}
	}
	fmt.Printf("go client: %d passed, %d failed\n", passed, failed)
	return ok
}

func dial(socket string) (*ttrpc.Client, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn), nil
}

func echo(ctx context.Context, c *ttrpc.Client, p []byte) ([]byte, error) {
	var resp wrapperspb.BytesValue
	if err := c.Call(ctx, service, "Echo", wrapperspb.Bytes(p), &resp); err != nil {
		return nil, err
	}
	return resp.Value, nil
}

func wantCode(err error, code codes.Code) error {
	if err == nil {
		return fmt.Errorf("got success, want %v", code)
	}
	if got := status.Code(err); got != code {
		return fmt.Errorf("got %v (%v), want %v", got, err, code)
	}
	return nil
}

func caseUnary(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, p := range [][]byte{[]byte("hello"), {}, bytes.Repeat([]byte{0, 1, 2, 255}, 256<<10)} {
		got, err := echo(context.Background(), c, p)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, p) {
			return fmt.Errorf("echo of %d bytes came back as %d bytes", len(p), len(got))
		}
	}
	return nil
}

func caseConcurrent(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := []byte(fmt.Sprintf("call-%d", i))
			got, err := echo(context.Background(), c, want)
			if err == nil && !bytes.Equal(got, want) {
				err = fmt.Errorf("call %d got %q", i, got)
			}
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func caseOutliving(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	done := make(chan error, 1)
	go func() {
		var resp wrapperspb.StringValue
		err := c.Call(context.Background(), service, "Hold", wrapperspb.String("long"), &resp)
		if err == nil && resp.Value != "released long" {
			err = fmt.Errorf("hold returned %q", resp.Value)
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	for i := 0; i < 10; i++ {
		if _, err := echo(context.Background(), c, []byte("meanwhile")); err != nil {
			return fmt.Errorf("call during hold: %w", err)
		}
	}
	select {
	case err := <-done:
		return fmt.Errorf("hold returned before release: %v", err)
	default:
	}
	var ok wrapperspb.StringValue
	if err := c.Call(context.Background(), service, "Release", &wrapperspb.StringValue{}, &ok); err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		return errors.New("hold never returned after release")
	}
}

func caseMetadata(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	md := ttrpc.MD{}
	md.Set("containerd-namespace-ttrpc", "k8s.io")
	md.Append("multi", "a", "b")
	ctx := ttrpc.WithMetadata(context.Background(), md)
	var resp wrapperspb.StringValue
	if err := c.Call(ctx, service, "Metadata", &wrapperspb.StringValue{}, &resp); err != nil {
		return err
	}
	if want := "containerd-namespace-ttrpc=k8s.io;multi=a;multi=b;"; resp.Value != want {
		return fmt.Errorf("metadata came back as %q, want %q", resp.Value, want)
	}
	return nil
}

func caseErrorStatus(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	var resp wrapperspb.StringValue
	err = c.Call(context.Background(), service, "Fail", wrapperspb.String("x"), &resp)
	if e := wantCode(err, codes.FailedPrecondition); e != nil {
		return e
	}
	if msg := status.Convert(err).Message(); msg != "failing on purpose: x" {
		return fmt.Errorf("message %q", msg)
	}
	return nil
}

func caseUnknownMethod(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	var resp wrapperspb.StringValue
	if e := wantCode(c.Call(context.Background(), service, "NoSuchMethod", &wrapperspb.StringValue{}, &resp), codes.Unimplemented); e != nil {
		return e
	}
	return wantCode(c.Call(context.Background(), "no.such.Service", "Echo", &wrapperspb.StringValue{}, &resp), codes.Unimplemented)
}

func caseDeadline(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var resp wrapperspb.StringValue
	err = c.Call(ctx, service, "Hold", wrapperspb.String("deadline"), &resp)
	// Both ends enforce the deadline: whichever fires first decides whether the Go client
	// reports its own context error or the server's DEADLINE_EXCEEDED status. Both are right.
	if !errors.Is(err, context.DeadlineExceeded) {
		if e := wantCode(err, codes.DeadlineExceeded); e != nil {
			return e
		}
	}
	// The server must have dropped the held call: the connection still works.
	_, err = echo(context.Background(), c, []byte("after"))
	return err
}

func caseOversizeRequest(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = echo(context.Background(), c, make([]byte, maxFrame+1))
	if e := wantCode(err, codes.ResourceExhausted); e != nil {
		return e
	}
	_, err = echo(context.Background(), c, []byte("still usable"))
	return err
}

func caseOversizeResponse(socket string) error {
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.Close()
	var resp wrapperspb.BytesValue
	err = c.Call(context.Background(), service, "Big", wrapperspb.UInt64(maxFrame+1), &resp)
	if e := wantCode(err, codes.ResourceExhausted); e != nil {
		return e
	}
	_, err = echo(context.Background(), c, []byte("still usable"))
	return err
}

// caseRawOversizeFrame writes a frame announcing and carrying 4 MiB + 1 bytes, bypassing the
// client library's own check, and expects the server to answer that stream with
// RESOURCE_EXHAUSTED and then keep serving the connection.
func caseRawOversizeFrame(socket string) error {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	writeFrame := func(stream uint32, payload []byte) error {
		var h [10]byte
		binary.BigEndian.PutUint32(h[0:4], uint32(len(payload)))
		binary.BigEndian.PutUint32(h[4:8], stream)
		h[8] = 1 // request
		if _, err := conn.Write(h[:]); err != nil {
			return err
		}
		_, err := conn.Write(payload)
		return err
	}
	readResponse := func() (uint32, *ttrpc.Response, error) {
		var h [10]byte
		if _, err := io.ReadFull(conn, h[:]); err != nil {
			return 0, nil, err
		}
		body := make([]byte, binary.BigEndian.Uint32(h[0:4]))
		if _, err := io.ReadFull(conn, body); err != nil {
			return 0, nil, err
		}
		var resp ttrpc.Response
		if err := proto.Unmarshal(body, &resp); err != nil {
			return 0, nil, err
		}
		return binary.BigEndian.Uint32(h[4:8]), &resp, nil
	}
	if err := writeFrame(1, make([]byte, maxFrame+1)); err != nil {
		return err
	}
	stream, resp, err := readResponse()
	if err != nil {
		return err
	}
	if stream != 1 || resp.Status == nil || codes.Code(resp.Status.Code) != codes.ResourceExhausted {
		return fmt.Errorf("stream %d status %v, want stream 1 RESOURCE_EXHAUSTED", stream, resp.Status)
	}
	payload, _ := proto.Marshal(wrapperspb.Bytes([]byte("after")))
	req, _ := proto.Marshal(&ttrpc.Request{Service: service, Method: "Echo", Payload: payload})
	if err := writeFrame(3, req); err != nil {
		return err
	}
	stream, resp, err = readResponse()
	if err != nil {
		return err
	}
	var out wrapperspb.BytesValue
	if err := proto.Unmarshal(resp.Payload, &out); err != nil || stream != 3 || string(out.Value) != "after" {
		return fmt.Errorf("after oversize frame: stream %d value %q err %v", stream, out.Value, err)
	}
	return nil
}
