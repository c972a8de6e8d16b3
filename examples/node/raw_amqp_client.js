// Call a registered gc-fabric function from Node.js with nothing but amqplib: JSON in, JSON out.
//
// It follows docs/asyncapi.yaml (walked through in docs/integration.md): declare our result
// queue, publish a group manifest and one task per call (mandatory, confirmed), then match
// results to calls by task id. The broker login is the gc-user and the AMQP user_id, so the
// same code works on an open broker (guest) and on a secured one (your user, a token).
//
//   npm install amqplib
//   node raw_amqp_client.js --broker-url amqp://alice:TOKEN@host/%2F --endpoint EP_ID \
//        --function FN_ID '{"args": [1, 2]}' '{"args": [3], "kwargs": {"weight": 2}}'
//
// Prints one JSON line per call, in order: {"task_id", "state": "success", "value"}, or
// {"task_id", "state": "failed" | "cancelled", "error": {"type", "message", "traceback"}},
// or {"task_id", "state": "returned"} when the broker had no queue for the endpoint.
// Exits 0 when every call succeeded, 1 otherwise.
'use strict';
const crypto = require('crypto');
const { parseArgs } = require('util');
const amqp = require('amqplib');

const PROTOCOL_VERSION = 1; // the gc-protocol header: an AMQP integer
// Exactly the arguments of docs/asyncapi.yaml: a redeclare with others is refused.
const RESULT_QUEUE_ARGUMENTS = { 'x-queue-type': 'quorum', 'x-expires': 604800000 };

async function callAll(brokerUrl, endpointId, functionId, calls, timeoutSeconds) {
  const user = decodeURIComponent(new URL(brokerUrl).username) || 'guest';
  const group = crypto.randomUUID();
  const connection = await amqp.connect(brokerUrl);
  try {
    const channel = await connection.createConfirmChannel();
    let closedBy = null; // why the broker closed the channel (403 for an endpoint we may not use)
    channel.on('error', (err) => { closedBy = err; });
    const returned = new Set();
    // A basic.return comes before the basic.ack of the same publish: note it by task id.
    channel.on('return', (message) => returned.add(message.properties.messageId));
    await channel.checkExchange('gc.tasks'); // passive: the fabric declares exchanges
    const queue = `gc.results.${user}.${group}`;
    await channel.assertQueue(queue, { durable: true, exclusive: false, autoDelete: false,
      arguments: RESULT_QUEUE_ARGUMENTS });
    await channel.bindQueue(queue, 'gc.results', `${user}.${group}`);
    try {
      const taskIds = calls.map(() => crypto.randomUUID());
      publishManifest(channel, user, group, endpointId, taskIds);
      taskIds.forEach((taskId, i) =>
        publishTask(channel, user, group, endpointId, functionId, taskId, calls[i]));
      await channel.waitForConfirms(); // rejects on a basic.nack
      const outcomes = new Map([...returned].map((id) => [id, { task_id: id, state: 'returned' }]));
      await collect(channel, queue, new Set(taskIds.filter((id) => !returned.has(id))), outcomes,
        timeoutSeconds);
      return taskIds.map((id) => outcomes.get(id));
    } catch (err) {
      throw closedBy || err; // the awaited call saw only "Channel closed"
    } finally {
      if (!closedBy) await channel.deleteQueue(queue); // else x-expires removes it
    }
  } finally {
    await connection.close();
  }
}

function properties(user, extra) {
  return { contentType: 'application/json', deliveryMode: 2, userId: user, ...extra };
}

function publishManifest(channel, user, group, endpointId, taskIds) {
  const manifest = { task_group_id: group, endpoint_id: endpointId, user, task_ids: taskIds,
    submitted: Date.now() / 1000 };
  channel.publish('gc.events', `group.${group}.submitted`, Buffer.from(JSON.stringify(manifest)),
    properties(user, { headers: { 'gc-protocol': PROTOCOL_VERSION, 'gc-event': 'group-manifest' } }));
}

function publishTask(channel, user, group, endpointId, functionId, taskId, call) {
  channel.publish('gc.tasks', endpointId, Buffer.from(JSON.stringify(call)), properties(user, {
    mandatory: true, messageId: taskId, correlationId: group,
    headers: { 'gc-protocol': PROTOCOL_VERSION, 'gc-function-id': functionId,
      'gc-endpoint-id': endpointId, 'gc-user': user, 'gc-task-group': group,
      'gc-python': '', 'gc-serializer': 'json 1' },
  }));
}

// Consume results until every task in `waiting` has one; the first result per task id wins.
function collect(channel, queue, waiting, outcomes, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    if (waiting.size === 0) { resolve(); return; }
    const consumerTag = `raw-amqp-client-${crypto.randomUUID()}`;
    const timer = setTimeout(() => reject(new Error(
      `no result within ${timeoutSeconds}s for tasks ${[...waiting].join(', ')}`)), timeoutSeconds * 1000);
    channel.consume(queue, (message) => {
      if (message === null) { reject(new Error(`the broker cancelled our consumer of ${queue}`)); return; }
      const taskId = message.properties.messageId;
      if (waiting.delete(taskId)) outcomes.set(taskId, { task_id: taskId, ...outcome(message) });
      channel.ack(message); // after handling it: an unacked result comes back on reconnect
      if (waiting.size === 0) { clearTimeout(timer); channel.cancel(consumerTag).then(resolve, reject); }
    }, { noAck: false, consumerTag }).catch(reject);
  });
}

function outcome(message) {
  const state = String(message.properties.headers['gc-state']);
  const body = JSON.parse(message.content.toString('utf8'));
  if (state === 'success') return { state, value: body };
  return { state, error: body }; // failed or cancelled: {type, message, traceback}
}

async function main() {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: {
    'broker-url': { type: 'string', default: process.env.GC_BROKER_URL || 'amqp://guest:guest@127.0.0.1:5672/%2F' },
    endpoint: { type: 'string' }, function: { type: 'string' },
    timeout: { type: 'string', default: '60' },
  } });
  if (!values.endpoint || !values.function || positionals.length === 0) {
    throw new Error('usage: raw_amqp_client.js --endpoint ID --function ID CALL_JSON...');
  }
  const outcomes = await callAll(values['broker-url'], values.endpoint, values.function,
    positionals.map((text) => JSON.parse(text)), Number(values.timeout));
  outcomes.forEach((o) => console.log(JSON.stringify(o)));
  return outcomes.every((o) => o.state === 'success') ? 0 : 1;
}

main().then((code) => { process.exitCode = code; },
  (err) => { console.error(`error: ${err.message}`); process.exitCode = 2; });
