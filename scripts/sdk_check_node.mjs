// End-to-end check with the official openai Node SDK's Realtime WebSocket
// client (OpenAIRealtimeWS, on the `ws` package) through passage.
//
// Usage: node sdk_check_node.mjs BASE_URL   (with openai and ws installed
// where Node resolves them; scripts/sdk_check.sh does that)
//
// Opens a session with the SDK, which derives .../v1/realtime from the base
// URL but always dials wss:// (TLS). passage-client's endpoint is plain
// HTTP on 127.0.0.1, so the socket is opened with `net.connect` instead of
// `tls.connect` (the `ws` package's createConnection option, passed
// through the SDK's `options`): what a Node app does to use passage for
// Realtime today. Then it checks session.created (the relay's key upstream, never the
// app's placeholder), asks for a response, collects its deltas and the
// response.done with its usage, and closes.
import net from 'node:net';
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const baseURL = process.argv[2];
const client = new OpenAI({ baseURL, apiKey: 'sk-app-placeholder', maxRetries: 0 });
const started = performance.now();
const rt = new OpenAIRealtimeWS(
  { model: 'gpt-realtime', options: { createConnection: (options) => net.connect(options) } },
  client,
);

const fail = (why) => {
  console.error(`node realtime: FAIL: ${why}`);
  process.exit(1);
};
const timer = setTimeout(() => fail('no response.done within 10 s'), 10_000);
let deltas = '';
rt.on('error', (err) => fail(`SDK error: ${err.message}`));
rt.on('session.created', (event) => {
  const auth = event.authorization ?? '';
  if (!auth.startsWith('Bearer sk-relay-held-')) fail('the upstream did not get the relay key');
  rt.send({ type: 'response.create' });
});
rt.on('response.output_text.delta', (event) => {
  deltas += event.delta;
});
rt.on('response.done', (event) => {
  clearTimeout(timer);
  const usage = event.response?.usage ?? {};
  if (deltas !== 'Hello!') fail(`deltas ${JSON.stringify(deltas)}`);
  if (usage.input_tokens !== 11 || usage.output_tokens !== 7) fail(`usage ${JSON.stringify(usage)}`);
  const ms = Math.round(performance.now() - started);
  console.log(`node realtime session: session.created, deltas "${deltas}", response.done with ${usage.total_tokens} tokens, in ${ms} ms`);
  rt.close();
});
rt.socket.on('close', () => process.exit(0));
