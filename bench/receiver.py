"""bench/receiver: a webhook receiver in a process of its own (uvicorn, verifying nothing, answering
204), so its CPU is not counted against the sender it measures; GET /count says how many POSTs came.

    .venv/bin/python bench/receiver.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Response

app = FastAPI()
received = 0


@app.post("/hook")
async def hook() -> Response:
    global received
    received += 1
    return Response(status_code=204)


@app.get("/count")
async def count() -> dict[str, int]:
    return {"received": received}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False)
