"""Two CPU processes (gloo) train the tokenizer + losses under DDP, with ragged cluster counts per rank.

The ranks must end with identical parameters, equal to those of one process
training on the whole batch: the contrastive loss gathers across ranks with
gradients, so DDP's averaged gradient is the full-batch gradient.
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from setok_model import ConceptContrastiveLoss, SeTokConfig, SeTokDetokenizer, SeTokTokenizer, pool_tokens, reconstruction_loss

WORLD, PER_RANK, STEPS, LR = 2, 2, 3, 0.05


class Trainee(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = SeTokConfig(8, 16, 12, 2, 24, 1, 1, k=3, min_clusters=3, max_clusters=6)
        self.tokenizer = SeTokTokenizer(config)
        self.detokenizer = SeTokDetokenizer(12, 16, 2, 24, 1, grid=(4, 4), out_dim=5)
        self.contrast = ConceptContrastiveLoss()
        self.double()

    def forward(self, features, text, concepts, targets):
        out = self.tokenizer(features)
        contrast = self.contrast(pool_tokens(out.tokens, out.cu_clusters), text, concepts)
        return contrast + reconstruction_loss(self.detokenizer(out.tokens, out.cu_clusters), targets), out.num_clusters


def data():
    g = torch.Generator().manual_seed(1)
    B = WORLD * PER_RANK
    blobs = torch.randn(B, 5, 8, generator=g, dtype=torch.float64) * 3
    # tight blobs, two per image on rank 0, five on rank 1: ragged cluster counts across ranks
    which = torch.stack([torch.randint(0, 2 if b < PER_RANK else 5, (16,), generator=g) for b in range(B)])
    features = blobs.gather(1, which[..., None].expand(B, 16, 8)) + 0.05 * torch.randn(B, 16, 8, generator=g, dtype=torch.float64)
    text = torch.randn(B, 12, generator=g, dtype=torch.float64)
    concepts = torch.randn(B, 2, 12, generator=g, dtype=torch.float64)
    targets = torch.randn(B, 16, 5, generator=g, dtype=torch.float64)
    return features, text, concepts, targets


def train(model, batch):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    counts = None
    for _ in range(STEPS):
        opt.zero_grad()
        loss, counts = model(*batch)
        loss.backward()
        opt.step()
    return counts


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mine = [t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in data()]
        model = DistributedDataParallel(Trainee())
        counts = train(model, mine)
        torch.save({"counts": counts, **model.module.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_stay_identical_and_match_full_batch_training(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    full = Trainee()
    counts = train(full, data())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert counts[:PER_RANK].sum() != counts[PER_RANK:].sum(), "the ranks must have different cluster counts"
    assert torch.equal(torch.cat([r.pop("counts") for r in ranks]), counts)
    for name, value in full.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-9, atol=1e-11, msg=name)
    assert not torch.equal(full.state_dict()["tokenizer.out.weight"], Trainee().state_dict()["tokenizer.out.weight"])
