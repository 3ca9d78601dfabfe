"""End-to-end check with the official openai Python SDK through passage.

Usage: sdk_check.py BASE_URL

Runs a streaming chat completion (checking the chunks arrive spread out as
the mock upstream sends them, 50 ms apart), a plain chat completion, a
3 MiB file upload (checking size and SHA-256 as the upstream saw them), an
upstream 429, and a Realtime session over WebSocket (the SDK's own realtime
client: session.created, a response's deltas and response.done).
"""

import hashlib
import os
import sys
import time

import openai


def main() -> int:
    base_url = sys.argv[1]
    # The app's key is a placeholder: the relay holds the real one.
    client = openai.OpenAI(base_url=base_url, api_key="sk-app-placeholder", max_retries=0, timeout=30)

    started = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )
    arrivals, text = [], ""
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    expected = "".join(f"tok{i} " for i in range(10))
    assert text == expected, f"streamed text {text!r} != {expected!r}"
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.4, f"chunks bunched: 10 chunks sent over 0.45 s arrived within {spread:.3f} s"
    print(f"streaming chat: {len(arrivals)} chunks over {spread * 1000:.0f} ms "
          f"(first after {(arrivals[0] - started) * 1000:.0f} ms)")

    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
    )
    content = completion.choices[0].message.content
    assert content == "Hello from the mock upstream", content
    print(f"chat completion: {content!r}, usage {completion.usage.total_tokens} tokens")

    data = os.urandom(3 * 1024 * 1024)
    uploaded = client.files.create(file=("train.jsonl", data), purpose="assistants")
    assert uploaded.bytes == len(data), f"upstream stored {uploaded.bytes} bytes, sent {len(data)}"
    digest = (uploaded.model_extra or {}).get("sha256")
    assert digest == hashlib.sha256(data).hexdigest(), "uploaded content differs"
    assert uploaded.filename == "train.jsonl", uploaded.filename
    print(f"file upload: {uploaded.bytes} bytes, sha256 matches")

    try:
        client.get("/status/429", cast_to=object)
        raise AssertionError("429 not raised")
    except openai.RateLimitError as err:
        assert err.response.headers.get("retry-after") == "7"
        print("upstream 429 reaches the SDK as RateLimitError with retry-after")

    # The SDK derives ws://.../v1/realtime from the same base_url.
    started = time.monotonic()
    with client.realtime.connect(model="gpt-realtime") as connection:
        created = connection.recv()
        assert created.type == "session.created", created.type
        seen = created.model_dump()
        # The relay's key reached the upstream, never the app's placeholder.
        assert seen.get("authorization", "").startswith("Bearer sk-relay-held-"), "wrong key upstream"
        connection.send({"type": "response.create"})
        deltas, done = "", None
        while done is None:
            event = connection.recv()
            if event.type == "response.output_text.delta":
                deltas += event.delta
            elif event.type == "response.done":
                done = event
        assert deltas == "Hello!", deltas
        usage = done.response.usage
        assert usage.input_tokens == 11 and usage.output_tokens == 7, usage
    print(f"realtime session: session.created, deltas {deltas!r}, response.done with "
          f"{usage.total_tokens} tokens, in {(time.monotonic() - started) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
