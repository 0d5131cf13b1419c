// Node's @grpc/grpc-js as a SPIFFE Workload API client of the Citadel agent.
// Loads the repository's workload.proto at run time and prints one JSON line.
//
// usage: node fetch_x509svid.js PROTO_ROOT SOCKET [AUTHORITY]
//   AUTHORITY, when given, overrides the :authority grpc-js would send (the
//   raw socket path, as grpc-java and grpc-swift send it).
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoRoot, socket, authority] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(protoRoot, 'spiffe/workload/workload.proto'), {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  defaults: true,
});
const { SpiffeWorkloadAPI } = grpc.loadPackageDefinition(definition);
const options = authority ? { 'grpc.default_authority': authority } : {};
const client = new SpiffeWorkloadAPI(`unix:${socket}`, grpc.credentials.createInsecure(), options);

const metadata = new grpc.Metadata();
metadata.add('workload.spiffe.io', 'true');
const deadline = new Date(Date.now() + 20000);
const call = client.FetchX509SVID({}, metadata, { deadline });
let answered = false;

function finish(result) {
  if (answered) return;
  answered = true;
  process.stdout.write(JSON.stringify(result) + '\n');
  call.cancel();
  client.close();
}

call.on('data', (response) => {
  finish({
    code: 'OK',
    svids: response.svids.map((s) => ({
      spiffe_id: s.spiffe_id,
      x509_svid_len: s.x509_svid.length,
      x509_svid_key_len: s.x509_svid_key.length,
      bundle_len: s.bundle.length,
    })),
  });
});
call.on('error', (err) => {
  finish({ code: grpc.status[err.code], details: err.details });
});
