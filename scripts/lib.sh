# Shell helpers the load and benchmark scripts share; sourced, not run.

# A loopback UDP port free right now.
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
