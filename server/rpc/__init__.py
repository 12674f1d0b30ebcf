"""The gRPC frontend: the grpc.aio servicer, a client, and the code generated from proto/."""
