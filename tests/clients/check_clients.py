"""Drives a running `hypura serve` with the official Python clients, `openai` and `ollama`.

Usage: python3 check_clients.py http://127.0.0.1:PORT MODEL_NAME
Exits non-zero (with a traceback) on the first check that fails. Run by tests/clients.rs.
"""

import sys

import ollama
import openai


def check_openai(host, model):
    oa = openai.OpenAI(base_url=f"{host}/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in oa.models.list()]
    assert ids == [model], ids
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = oa.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant", choice
    assert choice.finish_reason in ("stop", "length"), choice
    u = r.usage
    assert 0 < u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    chunks = list(
        oa.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content, (streamed, choice.message.content)
    assert chunks[-1].usage.completion_tokens == u.completion_tokens, chunks[-1]
    c = oa.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert c.usage.completion_tokens <= 5, c
    parts = list(oa.completions.create(model=model, prompt="Once upon a time", max_tokens=5,
                                       temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == c.choices[0].text
    try:
        oa.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e), e
    try:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "x " * 5000}])
        raise AssertionError("an over-long prompt was accepted")
    except openai.BadRequestError as e:
        assert "context" in str(e), e
    print("openai client: ok")


def check_ollama(host, model):
    cl = ollama.Client(host=host, timeout=120)
    names = [m.model for m in cl.list().models]
    assert f"{model}:latest" in names, names
    info = cl.show(model)
    assert info.details.format == "gguf", info.details
    assert info.template, info
    opts = {"temperature": 0, "num_predict": 8}
    g = cl.generate(model=model, prompt="Once upon a time", options=opts)
    assert g.done and 0 < g.eval_count <= 8 and g.done_reason in ("stop", "length"), g
    parts = list(cl.generate(model=model, prompt="Once upon a time", options=opts, stream=True))
    assert "".join(p.response for p in parts) == g.response
    assert parts[-1].done and parts[-1].eval_count == g.eval_count
    msgs = [{"role": "user", "content": "Hi"}]
    ch = cl.chat(model=model, messages=msgs, options=opts)
    assert ch.message.role == "assistant" and ch.done, ch
    parts = list(cl.chat(model=model, messages=msgs, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == ch.message.content
    try:
        cl.chat(model="no-such-model", messages=msgs)
        raise AssertionError("an unknown model was accepted")
    except ollama.ResponseError as e:
        assert e.status_code == 404, e
    print("ollama client: ok")


if __name__ == "__main__":
    host, model = sys.argv[1], sys.argv[2]
    check_openai(host, model)
    check_ollama(host, model)
