"""Chat with a model from the command line: `python -m minicai.generate --prompt "How do I bake bread?"`.

Renders the conversation with the model's own chat template, samples with the KV-cache sampler, prints the reply.
Without --prompt it reads prompts interactively (one line each; an empty line or EOF ends the chat)."""

from __future__ import annotations

import argparse
import sys
import time

from minicai.run import add_common_args, cli_main, load_model_and_tokenizer, setup
from minicai.sampling import generate, response_ids


def reply(model, tok, messages: list[dict], args) -> tuple[str, int]:
    prompt = tok.render(messages, add_generation_prompt=True)
    gen = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=args.seed)
    ids = response_ids(gen, 0, tok.stop_ids)
    return tok.decode(ids).strip(), int(gen.mask[0].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out_default="-")
    parser.add_argument("--prompt", action="append", help="a user message (repeat for several one-turn chats)")
    parser.add_argument("--system", default=None, help="a system message (default: the template's own)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args()
    device, dtype = setup(args)
    model, tok, path = load_model_and_tokenizer(args.model, device, dtype, fast=not args.no_fast)
    print(f"model: {path} ({device}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        for text in args.prompt:
            start = time.perf_counter()
            answer, n = reply(model, tok, system + [{"role": "user", "content": text}], args)
            secs = time.perf_counter() - start
            print(f"user: {text}\nassistant: {answer}\n", flush=True)
            print(f"({n} tokens in {secs:.1f} s, {n / secs:.1f} tokens/s)", file=sys.stderr)
        return
    messages = list(system)
    while True:  # interactive multi-turn chat
        try:
            text = input("user> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        answer, _ = reply(model, tok, messages, args)
        messages.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}")


if __name__ == "__main__":
    cli_main(main)
