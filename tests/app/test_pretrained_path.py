"""TVS_MODEL=ViT-B-32:/path/to/weights.pt: the real-model code path, end to end, with a local open_clip file.

Real weights cannot be downloaded here, so a ViT-B-32 with random weights stands in for them: saved as
open_clip's pretrained loader reads a local file (a plain state dict), loaded by the service through
open_clip.create_model(..., pretrained=path), then used to index a clip and answer a search.
"""

from __future__ import annotations

import pytest
import torch

from app.settings import Settings


@pytest.mark.slow
def test_service_runs_on_a_local_open_clip_checkpoint(
    tmp_path, monkeypatch, launch, new_database, clips, api
):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(1234)  # not the seed the service builds its random-weight presets with
    saved = open_clip.create_model("ViT-B-32").state_dict()
    weights = tmp_path / "vit-b-32-random.pt"
    torch.save({k: v.half() for k, v in saved.items()}, weights)  # fp16 on disk, as many releases are
    del saved

    monkeypatch.setenv("TVS_MODEL", f"ViT-B-32:{weights}")
    settings = Settings()
    assert settings.model == f"ViT-B-32:{weights}"
    clip = clips[0]
    with launch(tmp_path / "data", new_database("sqlite"), model=settings.model) as client:
        health = client.get("/health").json()
        assert health["ready"], health
        assert health["model"]["id"].startswith("ViT-B-32:vit-b-32-random.pt-")
        assert (health["model"]["dim"], health["model"]["num_frames"]) == (512, 12)

        # The loaded weights are the file's, not a fresh random init (compared in the service's precision).
        on_disk = torch.load(weights, map_location="cpu", weights_only=True)
        loaded = client.app.state.services.model.clip.state_dict()
        for name in ("visual.conv1.weight", "token_embedding.weight"):
            assert torch.equal(loaded[name].cpu(), on_disk[name].float().to(loaded[name].dtype)), name
        del on_disk, loaded

        (video_id,) = api.ingest(client, [clip["path"]], [clip["caption"]])
        r = client.post("/search", json={"query": clip["caption"], "limit": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [res["video_id"] for res in body["results"]] == [video_id]
        assert body["model"]["id"] == health["model"]["id"]
