"""The official OpenAI Python client against a running swarm node: a completion and a streamed
chat completion, models, and an error. Usage: openai_client.py BASE_URL TOKEN"""
import sys

import openai
from openai import OpenAI

base, token = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)

ids = [m.id for m in client.models.list()]
assert "tiny" in ids, ids

done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                 temperature=0, extra_body={"ignore_eos": True})
assert done.object == "text_completion", done
assert done.usage.completion_tokens == 5, done.usage
assert done.choices[0].finish_reason == "length", done
assert isinstance(done.choices[0].text, str)

stream = client.chat.completions.create(
    model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
    extra_body={"ignore_eos": True})
text, finish, usage, chunks = "", None, None, 0
for chunk in stream:
    chunks += 1
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == 6, usage

plain = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
assert plain.choices[0].message.content == text, (plain.choices[0].message.content, text)

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected a 404")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=7)
    raise SystemExit("expected a 400")
except openai.BadRequestError as e:
    assert e.status_code == 400

print(f"openai client ok: {chunks} chunks, text {text!r}")
