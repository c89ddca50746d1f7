"""Stand-in for LLaDA's ``generate.py`` (same interface as its 2025-10 version, written for klass-patch).

Semi-autoregressive decoding: the generation is split into blocks decoded left to right; each block gets
``steps // num_blocks`` forwards and at each one the most confident masked positions of the block are
unmasked (``remasking='low_confidence'``), or random ones (``'random'``), as many as a linear schedule says.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file
import torch
import torch.nn.functional as F


def add_gumbel_noise(logits, temperature):
    """Gumbel-max sampling in float64: argmax of the returned scores is a sample at ``temperature``."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def get_num_transfer_tokens(mask_index, steps):
    """[batch, steps]: how many tokens to unmask at each step, spreading the masks evenly."""
    total = mask_index.sum(dim=1, keepdim=True)
    per_step = total // steps + torch.zeros(total.shape[0], steps, dtype=torch.int64, device=mask_index.device)
    extra = torch.arange(steps, device=mask_index.device).unsqueeze(0) < (total % steps)
    return per_step + extra.long()


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=126336, logits_eos_inf=False,
             confidence_eos_eot_inf=False):
    rows, plen = prompt.shape
    x = torch.full((rows, plen + gen_length), mask_id, dtype=torch.long, device=model.device)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, gen_length))], dim=-1)
    is_prompt = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = plen + b * block_length, plen + (b + 1) * block_length
        schedule = get_num_transfer_tokens(x[:, lo:hi] == mask_id, steps)
        for i in range(steps):
            masked = x == mask_id
            if cfg_scale > 0.:
                uncond = torch.where(is_prompt, mask_id, x)
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                both = model(torch.cat([x, uncond]), attention_mask=am).logits
                cond, unc = both.chunk(2)
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, 126081] = -torch.inf
            x0 = add_gumbel_noise(logits, temperature).argmax(-1)
            if confidence_eos_eot_inf:
                logits[:, :, 126348] = -torch.inf
            if remasking == 'low_confidence':
                score = F.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == 'random':
                score = torch.rand(x0.shape, device=x0.device)
            else:
                raise NotImplementedError(remasking)
            score[:, hi:] = -float('inf')
            x0 = torch.where(masked, x0, x)
            score = torch.where(masked, score, -float('inf'))
            chosen = torch.zeros_like(masked)
            for r in range(rows):
                chosen[r, score[r].topk(int(schedule[r, i])).indices] = True
            x[chosen] = x0[chosen]
    return x
