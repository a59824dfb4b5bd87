"""Run a GGUF file in llama.cpp (llama-cpp-python, .venv-llamacpp): the tests' and benchmark's independent reader.

    .venv-llamacpp/bin/python scripts/llamacpp_run.py REQUEST.json RESULT_DIR

REQUEST: {"model": PATH, "prompts": [[token ids], ...], "texts": [str, ...], "max_new_tokens": N,
          "logits": bool, "answers": [str, ...], "n_ctx": N (optional, 2048)}
RESULT_DIR gets result.json ({"greedy": [[ids]], "tokenized": [[ids]], "answers": [str]}) and logits_<i>.npy:
llama.cpp's logits at every prompt position of prompt i. Greedy decoding is llama.cpp's own sampler at temperature
0 (argmax). The KV cache is kept in F32 (llama.cpp's default is F16) so that the logits compare with an F32 forward.
An ALiBi model (Jais, Baichuan-13B) masks every cell of its context at each step, so its tests ask for a short one.
Texts are tokenised with special tokens parsed (as transformers does: `<|im_start|>` is one token).
`answers` are chat prompts answered by llama.cpp's own chat-template handling (create_chat_completion).
Imports only llama_cpp and numpy: this venv has neither torch nor automodel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0


def load(path: str, logits_all: bool, n_ctx: int = 2048) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=1, n_batch=512, logits_all=logits_all,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, seed=0)


def greedy(llm: llama_cpp.Llama, prompt: list[int], max_new_tokens: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == max_new_tokens:
            break
        out.append(int(token))
    return out


def main() -> int:
    request = json.loads(Path(sys.argv[1]).read_text())
    result_dir = Path(sys.argv[2])
    llm = load(request["model"], bool(request.get("logits")), request.get("n_ctx", 2048))
    result = {"greedy": [], "tokenized": [], "answers": []}
    for index, prompt in enumerate(request.get("prompts", [])):
        if request.get("logits"):
            llm.reset()
            llm.eval(prompt)
            np.save(result_dir / f"logits_{index}.npy", np.asarray(llm.scores[:len(prompt)], dtype=np.float32))
        result["greedy"].append(greedy(llm, prompt, request.get("max_new_tokens", 8)))
    for text in request.get("texts", []):
        result["tokenized"].append(llm.tokenize(text.encode(), add_bos=True, special=True))
    for question in request.get("answers", []):
        reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0, top_k=1,
                                           max_tokens=request.get("max_new_tokens", 32))
        result["answers"].append(reply["choices"][0]["message"]["content"])
    (result_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
