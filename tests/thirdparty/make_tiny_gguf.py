"""Write a tiny random-weight GGUF model that llama.cpp can load and run.

A "llama"-architecture model (2 layers, 64-wide embeddings, a SentencePiece-style vocabulary
of three special tokens and the 256 byte tokens) with weights drawn from a seeded RNG: the
same file on every run, a few hundred kilobytes, generating gibberish at thousands of
tokens a second on a CPU. Enough to drive an OpenAI-compatible server through its whole
request, streaming and grammar path without downloading any weights.

Run with a Python that has the `gguf` and `numpy` packages (the llama-cpp-python
environment has both): `python make_tiny_gguf.py OUT.gguf`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYERS = 2
N_HEADS = 4
N_FF = 128
CONTEXT_LENGTH = 2048
SEED = 16
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unknown, begin, end


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types): the specials, then one token per byte, so any text
    tokenizes (by byte fallback) and any output bytes detokenize."""
    tokens = list(SPECIAL_TOKENS) + [f"<0x{byte:02X}>" for byte in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(kind) for kind in types]


def write_model(path: Path, seed: int = SEED) -> Path:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("switchboard-tiny-random")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_rope_dimension_count(N_EMBD // N_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD))
    for layer in range(N_LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    write_model(args.out, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
