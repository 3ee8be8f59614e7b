// The official openai Node SDK against a running sparsity-router gateway: chat, stream, tools.
//
//   GATEWAY_URL=http://127.0.0.1:8080/v1 node --test        (in tests/node, after npm ci)
//
// tests/router/test_node_sdk.py starts a gateway with fake upstreams (mode "tools") and runs this.
// GATEWAY_API_KEY is sent when the gateway requires a key; GATEWAY_MODEL (default "auto") is the
// model asked for.
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";

const baseURL = process.env.GATEWAY_URL;
if (!baseURL) throw new Error("set GATEWAY_URL to the gateway's .../v1 URL");
const model = process.env.GATEWAY_MODEL ?? "auto";
const client = new OpenAI({
  baseURL,
  apiKey: process.env.GATEWAY_API_KEY ?? "unused",
  maxRetries: 0,
  timeout: 60_000,
});

const weatherTool = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
    },
  },
};
const question = [{ role: "user", content: "What is the weather in Paris?" }];

test("models lists the virtual model", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(model), `${model} not in ${ids}`);
});

test("chat: an answer, and the routing headers", async () => {
  const { data, response } = await client.chat.completions
    .create({ model, messages: [{ role: "user", content: "Say hello." }], max_tokens: 16 })
    .withResponse();
  assert.equal(data.object, "chat.completion");
  assert.equal(data.choices[0].message.role, "assistant");
  assert.ok(data.choices[0].message.content.length > 0);
  assert.ok(response.headers.get("x-router-backend"), "no x-router-backend header");
  assert.ok(data.usage.total_tokens > 0);
});

test("stream: chunks add up to the answer", async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "Count to three." }],
    max_tokens: 16,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  assert.ok(chunks >= 2, `only ${chunks} chunks`);
  assert.ok(text.length > 0);
  assert.equal(finish, "stop");
  assert.ok(usage && usage.completion_tokens > 0, "no usage chunk");
});

test("tools: a tool call, then the answer to its result", async () => {
  const first = await client.chat.completions.create({
    model,
    messages: question,
    tools: [weatherTool],
  });
  const message = first.choices[0].message;
  assert.equal(first.choices[0].finish_reason, "tool_calls");
  assert.equal(message.tool_calls.length, 1);
  const call = message.tool_calls[0];
  assert.equal(call.type, "function");
  assert.equal(call.function.name, "get_weather");
  assert.deepEqual(JSON.parse(call.function.arguments), { city: "Paris" });

  const second = await client.chat.completions.create({
    model,
    messages: [
      ...question,
      message,
      { role: "tool", tool_call_id: call.id, content: '{"sky": "clear"}' },
    ],
    tools: [weatherTool],
  });
  assert.equal(second.choices[0].finish_reason, "stop");
  assert.ok(second.choices[0].message.content.length > 0);
});

test("tools, streamed: the call's deltas assemble", async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: question,
    tools: [weatherTool],
    stream: true,
  });
  const calls = [];
  let finish = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      finish = choice.finish_reason ?? finish;
      for (const delta of choice.delta?.tool_calls ?? []) {
        calls[delta.index] ??= { id: "", name: "", arguments: "" };
        const call = calls[delta.index];
        call.id += delta.id ?? "";
        call.name += delta.function?.name ?? "";
        call.arguments += delta.function?.arguments ?? "";
      }
    }
  }
  assert.equal(finish, "tool_calls");
  assert.equal(calls.length, 1);
  assert.equal(calls[0].name, "get_weather");
  assert.ok(calls[0].id.length > 0);
  assert.deepEqual(JSON.parse(calls[0].arguments), { city: "Paris" });
});

test("the SDK's stream helper finishes with the tool call", async () => {
  const runner = client.chat.completions.stream({ model, messages: question, tools: [weatherTool] });
  const final = await runner.finalChatCompletion();
  const call = final.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, "get_weather");
  assert.deepEqual(JSON.parse(call.function.arguments), { city: "Paris" });
});

test("errors arrive as the SDK's typed errors", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model", messages: question }),
    (err) => err instanceof OpenAI.APIError && err.status >= 400 && err.status < 500,
  );
});

test("responses: an answer routed like chat", async () => {
  const { data, response } = await client.responses
    .create({ model, instructions: "Be brief.", input: "Say hello." })
    .withResponse();
  assert.equal(data.object, "response");
  assert.ok(data.output_text.startsWith("answer from"), data.output_text);
  assert.ok(response.headers.get("x-router-backend"), "no x-router-backend header");
});

test("responses, streamed: the text deltas and the completed event", async () => {
  const stream = await client.responses.create({ model, input: "Count to three.", stream: true });
  let text = "";
  let completed = false;
  for await (const event of stream) {
    if (event.type === "response.output_text.delta") text += event.delta;
    if (event.type === "response.completed") completed = true;
  }
  assert.ok(completed, "no response.completed event");
  assert.ok(text.startsWith("answer from"), text);
});

test("embeddings: a direct model, never probed", async () => {
  const embeddingModel = process.env.GATEWAY_EMBEDDING_MODEL ?? "small-direct";
  const { data, response } = await client.embeddings
    .create({ model: embeddingModel, input: ["one", "two"] })
    .withResponse();
  assert.equal(data.data.length, 2);
  assert.ok(data.data[0].embedding.length > 0);
  assert.equal(response.headers.get("x-router-score"), null);
});
