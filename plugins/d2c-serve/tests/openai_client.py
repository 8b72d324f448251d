"""Drives d2c-serve with the OpenAI Python SDK, as an application would, and prints what it saw
as one JSON object. tests/openai_sdk.rs starts the plugin and compares the answers with direct
llama-server requests; this script only observes.

    python openai_client.py BASE_URL TASKS_JSON
"""
import json
import sys

import openai

base_url, tasks = sys.argv[1], json.loads(sys.argv[2])
client = openai.OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=120)
# llama-server's own sampling fields: greedy, fixed seed, no prompt cache (as the Rust side).
greedy = {"top_k": 1, "seed": 42, "cache_prompt": False}
prompt = "The three most important things about rivers are"
messages = [{"role": "user", "content": "Name a colour."}]

seen = {"sdk_version": openai.__version__, "models": sorted(m.id for m in client.models.list().data), "tasks": {}}
for task in tasks:
    raw = client.completions.with_raw_response.create(model=task, prompt=prompt, max_tokens=8, temperature=0, extra_body=greedy)
    completion = raw.parse()
    chat = client.chat.completions.create(model=task, messages=messages, max_tokens=8, temperature=0, extra_body=greedy)
    chunks = list(client.completions.create(model=task, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=greedy))
    chat_chunks = list(
        client.chat.completions.create(model=task, messages=messages, max_tokens=8, temperature=0, stream=True, extra_body=greedy)
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    streamed_chat = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    seen["tasks"][task] = {
        "adapter_header": raw.headers.get("x-d2c-adapter"),
        "completion": completion.choices[0].text,
        "completion_model": completion.model,
        "chat_model": chat.model,
        "chat": chat.choices[0].message.content,
        "streamed_completion": streamed,
        "streamed_chat": streamed_chat,
        "streamed_models": sorted({c.model for c in chunks + chat_chunks}),
    }

try:
    client.completions.create(model="no-such-task", prompt=prompt, max_tokens=2)
    seen["unknown_task"] = {"error": None}
except openai.APIStatusError as e:
    seen["unknown_task"] = {
        "error": type(e).__name__,
        "is_not_found": isinstance(e, openai.NotFoundError),
        "status": e.status_code,
        "type": (e.body or {}).get("type") if isinstance(e.body, dict) else None,
        "message": str(e),
    }
print(json.dumps(seen))
