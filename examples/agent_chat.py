"""A ``create_agent`` chat whose model can call ``attention_prompt`` on the user's image.

    python examples/agent_chat.py --backend openai --model gpt-4o-mini --image photo.jpg \
        --question "How many red cars are there?"
    python examples/agent_chat.py --backend ollama --model qwen2.5vl --image photo.jpg --question "..."
    python examples/agent_chat.py --backend local --model demo        # offline, generated scene

The image goes into the user message once; when the model calls the tool it leaves ``image`` out and
the tool takes the user's image from the agent state. ``ImageToolMessageMiddleware`` moves the
returned annotated image into a user message for backends that reject images in tool messages.
With --backend local the demo LLaVA is tiny and rarely decides to call tools; the script then shows a
direct answer. Prints every message of the run and writes the tool's images to --out.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, ToolMessage

from agents.agent import create_api_agent
from api_tool.demo.scenes import generate_scene
from api_tool.images import encode_image, load_image
from api_tool.tool import AttentionPromptTool


def make_model(backend: str, model: str, base_url: str | None) -> BaseChatModel:
    if backend == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model=model, base_url=base_url, temperature=0)
    if backend == "ollama":
        from langchain_ollama import ChatOllama

        return ChatOllama(model=model, base_url=base_url, temperature=0)
    from agents.chat_models import ChatTransformersVLM

    return ChatTransformersVLM.from_pretrained(model, max_tokens=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("openai", "ollama", "local"), default="local")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--image", help="image path (default: a generated demo scene)")
    parser.add_argument("--question", help="the user's question")
    parser.add_argument("--attributor", default="demo")
    parser.add_argument("--out", type=Path, default=Path("out/agent_chat"))
    args = parser.parse_args()

    if args.image:
        image, question = load_image(args.image), args.question or "What is in this image?"
    else:
        scene = generate_scene(5, size=(320, 240))
        image, question = scene.image, args.question or f"Is there a {scene.objects[0].name} in the image?"
    data, mime_type = encode_image(image, max_side=1024)

    agent = create_api_agent(
        make_model(args.backend, args.model, args.base_url),
        attention_tool=AttentionPromptTool(attributor=args.attributor),
    )
    user = HumanMessage([{"type": "text", "text": question}, {"type": "image", "base64": data, "mime_type": mime_type}])
    result = agent.invoke({"messages": [user]})

    args.out.mkdir(parents=True, exist_ok=True)
    for index, message in enumerate(result["messages"]):
        if isinstance(message, ToolMessage) and isinstance(message.content, list):
            for block in message.content:
                if block.get("type") == "image":
                    path = args.out / f"tool_image_{index}.png"
                    path.write_bytes(base64.b64decode(block["base64"]))
                    print(f"[{message.type}] image written to {path}")
                elif block.get("type") == "text":
                    print(f"[{message.type}] {block['text']}")
        elif message.type == "ai" and getattr(message, "tool_calls", None):
            print(f"[ai] tool calls: {message.tool_calls}")
        else:
            print(f"[{message.type}] {message.text[:500]}")


if __name__ == "__main__":
    main()
