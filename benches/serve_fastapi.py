"""What a user would write instead of `vit-msn serve`: FastAPI + uvicorn around
`torch.jit.load` of the same artifact, speaking the same binary KServe v2
request so the same client drives both. No batching, no verification.

    python benches/serve_fastapi.py --artifact B/model_224x224.pt --port 8001 --threads 2
"""
import argparse
import json

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

ap = argparse.ArgumentParser()
ap.add_argument("--artifact", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--layers", type=int, required=True)
ap.add_argument("--heads", type=int, required=True)
ap.add_argument("--patches", type=int, required=True)
a = ap.parse_args()

torch.set_num_threads(a.threads)
module = torch.jit.load(a.artifact).eval()
head_mask = torch.ones(a.layers, a.heads)
with torch.inference_mode():
    for _ in range(3):
        module(torch.zeros(1, 3, 224, 224), torch.zeros(1, a.patches, dtype=torch.bool), head_mask)

app = FastAPI()


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.body()
    n = int(request.headers["inference-header-content-length"])
    header = json.loads(body[:n])
    shape = header["inputs"][0]["shape"]
    pixels = torch.from_numpy(np.frombuffer(body[n:], dtype=np.float32).reshape(shape).copy())
    with torch.inference_mode():
        out = module(pixels, torch.zeros(shape[0], a.patches, dtype=torch.bool), head_mask)
    logits = (out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out).numpy()
    raw = logits.astype(np.float32).tobytes()
    head = json.dumps({"model_name": name, "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return Response(head + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
