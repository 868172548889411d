"""OpenAI Agents SDK demo, fully offline: duplicate tool calls executed once.

    pip install 'singleflight-agents[openai]'
    python examples/openai_agents_demo.py
"""

from __future__ import annotations

import asyncio

from singleflight_agents import Singleflight
from singleflight_agents.demo_openai import run_openai_demo


async def main() -> None:
    with Singleflight() as sf:  # receipts in .singleflight/receipts.db under the cwd
        await run_openai_demo(sf)


if __name__ == "__main__":
    asyncio.run(main())
