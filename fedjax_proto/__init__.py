"""Generated gRPC/protobuf code for protos/fedjax_proto/*.proto (regenerate with `make proto`)."""
