"""Causal-LM cross-entropy that never materialises the full logits: lm_head and the loss, chunk by chunk.

With a 49k vocabulary (SmolLM2) the logits of a 1024-token batch are 200 MB in float32, and the stock path
writes them several times (lm_head output, `.float()` copy, log-softmax, its gradient). Here the label
positions are gathered first, then each chunk of `chunk_size` positions computes its logits, its loss and
the gradient with respect to its hidden states in one pass (the fused linear + cross-entropy of Liger and
Cut-Cross-Entropy); the backward pass only scales the stored gradient.

Written here because the maintained implementations do not run on a CPU: Liger-Kernel's fused linear
cross-entropy and Cut-Cross-Entropy's `cce` path are Triton GPU kernels, and CCE's CPU-capable
`torch_compile` path computes the full logits (checked: liger-kernel 0.8.5, cut-cross-entropy 25.1.1).

The loss equals transformers' `ForCausalLMLoss` (shifted labels, -100 ignored, sum / `num_items_in_batch`
when the Trainer passes it, else the mean), so gradient accumulation and reported losses are unchanged.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def _linear_ce_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk_size: int, divisor: float, dtype):
            # the gradient is computed here, chunk by chunk, so no chunk's logits outlive its loop iteration
            need_h, need_w = hidden.requires_grad, weight.requires_grad
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                h, w = hidden.to(dtype), weight.to(dtype)
                grad_h = torch.empty_like(h) if need_h else None
                grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                for s in range(0, h.shape[0], chunk_size):
                    hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
                    logits = (hc @ w.T).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                    if need_h or need_w:
                        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                        probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                        g = probs.div_(divisor).to(dtype)
                        if need_h:
                            grad_h[s:s + chunk_size] = g @ w
                        if need_w:
                            grad_w += (g.T @ hc).float()
            ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return total / divisor

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            h_dtype, w_dtype = ctx.dtypes
            gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
            gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
            return gh, gw, None, None, None, None

    return LinearCrossEntropy


_FUNCTION = None


def linear_cross_entropy(hidden, weight, targets, *, divisor=None, chunk_size: int = 256):
    """sum_i CE(hidden_i @ weight.T, targets_i) / divisor (default: the number of rows), without full logits.

    `hidden` [N, d] and `targets` [N] hold label positions only. Under autocast the matmuls run in the
    autocast dtype (bf16 on AMX), the softmax in float32, as the stock loss does.
    """
    import torch

    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_ce_function()
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    n = float(divisor) if divisor is not None else float(max(1, targets.shape[0]))
    return _FUNCTION.apply(hidden, weight, targets, chunk_size, n, dtype)


# causal LMs whose forward is exactly `lm_head(hidden)` + ForCausalLMLoss (no logit scaling or soft-capping)
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def head_weight(head):
    """The weight `head(x)` multiplies by: a plain bias-free Linear, or peft's TrainableTokens wrapper around one
    (added-token rows, merged in differentiably as peft's own forward does); None for anything else."""
    import torch

    if type(head) is torch.nn.Linear:
        return head.weight if head.bias is None else None
    layer = getattr(head, "token_adapter", None)  # peft.utils.other.TrainableTokensWrapper
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.bias is not None:
        return None
    if layer.disable_adapters or layer.merged or not layer.active_adapters:
        return base.weight
    return layer.get_merged_weights(layer.active_adapters)


def causal_lm_parts(model):
    """(decoder, lm_head) of a causal LM whose logits are `hidden @ weight.T`, through a peft wrapper; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = base.get_output_embeddings()
    decoder = getattr(base, base.base_model_prefix, None)
    if decoder is None or head_weight(head) is None:
        return None
    return decoder, head


def chunked_causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int = 256):
    """The loss `model(**inputs).loss` would give, through `linear_cross_entropy`; None if the model has no plain lm_head."""
    parts = causal_lm_parts(model)
    if parts is None:
        return None
    decoder, head = parts
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    hidden = decoder(**model_inputs, use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    return linear_cross_entropy(hidden[:, :-1][keep], head_weight(head), shifted[keep], divisor=num_items_in_batch,
                                chunk_size=chunk_size)


def chunked_loss_trainer_class():
    """A transformers Trainer whose loss is `chunked_causal_lm_loss` (the stock path where it does not apply).

    Only for an unwrapped model: under DistributedDataParallel the forward must go through the wrapper (it
    arms the gradient all-reduce), and calling the decoder inside it would bypass that, so DDP keeps the stock loss.
    """
    from transformers import Trainer

    class ChunkedLossTrainer(Trainer):
        chunk_size = 256

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = None
            plain = self.accelerator.unwrap_model(model) is model
            if plain and "labels" in inputs and self.label_smoother is None and self.compute_loss_func is None:
                loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch, self.chunk_size)
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return ChunkedLossTrainer
