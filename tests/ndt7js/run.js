// Runs the unmodified @m-lab/ndt7 client (M-Lab's official JavaScript ndt7 client, from
// the npm registry) under Node against one ndt7 server, and prints one JSON document:
// the library's return code, its last client and server measurements per subtest, and
// every error it reported.
//
//   node --experimental-websocket run.js HOST:PORT [ws|wss]
//
// The library is written for browsers: it starts each subtest in a Web Worker that uses
// the WebSocket global. Node 20 has WebSocket behind --experimental-websocket (undici) but
// no Worker global, so this file supplies one on top of worker_threads that gives the
// worker script the browser names it uses (self.onmessage, postMessage). Nothing in the
// library itself is changed.
'use strict';

const path = require('path');
const {Worker: ThreadWorker} = require('worker_threads');

const bootstrap = `
const {parentPort, workerData} = require('worker_threads');
globalThis.self = globalThis;
globalThis.postMessage = (message) => parentPort.postMessage(message);
require(workerData.filename);
parentPort.on('message', (data) => self.onmessage({data}));
`;

class BrowserStyleWorker {
  constructor(filename) {
    this.onmessage = null;
    this.thread = new ThreadWorker(bootstrap, {eval: true, workerData: {filename}});
    this.thread.on('message', (data) => this.onmessage && this.onmessage({data}));
    this.thread.on('error', (err) => this.onmessage &&
      this.onmessage({data: {MsgType: 'error', Error: String(err)}}));
  }
  postMessage(data) {
    this.thread.postMessage(data);
  }
  terminate() {
    this.thread.terminate();
  }
}
globalThis.Worker = BrowserStyleWorker;

const ndt7 = require('@m-lab/ndt7');
const src = path.dirname(require.resolve('@m-lab/ndt7'));

async function main() {
  const server = process.argv[2];
  const protocol = process.argv[3] || 'ws';
  if (!server) {
    console.error('usage: node --experimental-websocket run.js HOST:PORT [ws|wss]');
    process.exit(2);
  }
  if (typeof WebSocket === 'undefined') {
    console.error('no WebSocket global: run node with --experimental-websocket');
    process.exit(2);
  }
  const out = {library: 'ndt7-js', version: require('@m-lab/ndt7/package.json').version,
    server, protocol, errors: [], download: null, upload: null,
    downloadServerMessages: 0, uploadServerMessages: 0};
  const started = Date.now();
  const code = await ndt7.test({
    server, protocol, userAcceptedDataPolicy: true,
    metadata: {client_name: 'bbprobe-ci-harness', client_version: '1'},
    downloadworkerfile: path.join(src, 'ndt7-download-worker.js'),
    uploadworkerfile: path.join(src, 'ndt7-upload-worker.js'),
  }, {
    error: (err) => out.errors.push(String(err)),
    downloadMeasurement: (m) => { if (m.Source === 'server') out.downloadServerMessages++; },
    uploadMeasurement: (m) => { if (m.Source === 'server') out.uploadServerMessages++; },
    downloadComplete: (d) => { out.download = d; },
    uploadComplete: (d) => { out.upload = d; },
  });
  out.code = code;
  out.elapsed_s = (Date.now() - started) / 1000;
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(code === 0 && out.errors.length === 0 ? 0 : 1);
}

main().catch((err) => {
  console.error(String(err && err.stack || err));
  process.exit(1);
});
