"""The self-reflection loop with a hosted or served model as the target (documented; not run in CI).

Any LangChain chat model that reads images works unchanged. Two common set-ups:

    # OpenAI, or any OpenAI-compatible server (vLLM, llama.cpp server, LM Studio...)
    export OPENAI_API_KEY=...
    python examples/reflection_openai_ollama.py --backend openai --model gpt-4o-mini --image photo.jpg \
        --question "How many people are wearing hats?"
    python examples/reflection_openai_ollama.py --backend openai --base-url http://localhost:8000/v1 \
        --model llava-hf/llava-1.5-7b-hf --image photo.jpg --question "Is there a dog?"

    # Ollama (ollama pull llava)
    python examples/reflection_openai_ollama.py --backend ollama --model llava --image photo.jpg \
        --question "What colour is the car?"

The annotation runs locally (demo CLIP by default, or --attributor clip:ViT-L-14-336@openai when its
weights are cached); the target only ever receives ordinary user messages with images.
Needs ``pip install langchain-openai`` or ``pip install langchain-ollama``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from agents.prompts import STRATEGIES
from agents.reflection import reflect
from api_tool.tool import AttentionPromptTool


def make_target(backend: str, model: str, base_url: str | None) -> BaseChatModel:
    if backend == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model=model, base_url=base_url, temperature=0)
    from langchain_ollama import ChatOllama

    return ChatOllama(model=model, base_url=base_url, temperature=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("openai", "ollama"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--attributor", default="demo")
    parser.add_argument("--strategy", choices=tuple(STRATEGIES), default="verify")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/reflection_remote"))
    args = parser.parse_args()

    target = make_target(args.backend, args.model, args.base_url)
    tool = AttentionPromptTool(attributor=args.attributor, max_side=1024)
    result = reflect(args.question, args.image, target, tool, max_rounds=args.rounds, strategy=args.strategy)

    print(f"first answer: {result.first_answer}")
    args.out.mkdir(parents=True, exist_ok=True)
    for round_ in result.rounds:
        print(f"--- round {round_.index} ({round_.strategy}) reply:\n{round_.reply}")
        if round_.annotated_image is not None:
            round_.annotated_image.save(args.out / f"annotated_round{round_.index}.png")
    print(f"final answer: {result.final_answer} (changed: {result.changed})")
    print("timings (s):", {stage: round(seconds, 3) for stage, seconds in result.timings.items()})


if __name__ == "__main__":
    main()
