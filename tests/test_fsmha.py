"""``@fsmha``: our mechanisms inside fairseq's own transformer layers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_fairseq

from efficient_attention import MultiheadAttention, fsmha

ROOT = Path(__file__).resolve().parents[1]


def test_fsmha_without_fairseq_raises_import_error():
    code = (
        "import sys; sys.modules['fairseq'] = None\n"
        "from efficient_attention import MultiheadAttention, fsmha\n"
        "try:\n    fsmha(MultiheadAttention)\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "ImportError: fsmha needs fairseq" in out.stdout


def test_fsmha_decorator_and_fairseq_keywords():
    require_fairseq()

    @fsmha
    class FSVanilla(MultiheadAttention):
        pass

    m = FSVanilla(16, 4, dropout=0.1, self_attention=True, dictionary=None, xformers_att_config=None)
    assert isinstance(m, MultiheadAttention) and FSVanilla.__name__ == "FSVanilla"
    assert FSVanilla.options() == MultiheadAttention.options()
    assert "FSVanilla(" in repr(m)
    with pytest.raises(ValueError, match="xformers"):
        FSVanilla(16, 4, xformers_att_config='{"name": "scaled_dot_product"}')
    with pytest.raises(TypeError):
        fsmha(int)


def _layers(causal: bool):
    require_fairseq()
    from argparse import Namespace

    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

    FSVanilla = fsmha(MultiheadAttention)

    class OurDecoderLayer(TransformerDecoderLayerBase):
        def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
            return FSVanilla(
                embed_dim,
                cfg.decoder.attention_heads,
                dropout=cfg.attention_dropout,
                self_attention=True,
                causal=causal,
            )

        def build_encoder_attention(self, embed_dim, cfg):
            return FSVanilla(
                embed_dim,
                cfg.decoder.attention_heads,
                kdim=cfg.encoder.embed_dim,
                vdim=cfg.encoder.embed_dim,
                encoder_decoder_attention=True,
            )

    cfg = TransformerConfig.from_namespace(
        Namespace(
            decoder_embed_dim=16,
            decoder_ffn_embed_dim=32,
            decoder_attention_heads=4,
            encoder_embed_dim=16,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    )
    torch.manual_seed(0)
    ours = OurDecoderLayer(cfg).eval()
    stock = TransformerDecoderLayerBase(cfg).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    return ours, stock


def test_inside_fairseq_decoder_layer_full_and_incremental():
    ours, stock = _layers(causal=True)
    T, S, B = 6, 5, 2
    x, enc = torch.randn(T, B, 16), torch.randn(S, B, 16)
    enc_pad = torch.zeros(B, S, dtype=torch.bool)
    enc_pad[1, -1] = True
    future = torch.triu(torch.full((T, T), float("-inf")), 1)
    ref, _, _ = stock(x, enc, enc_pad, self_attn_mask=future)
    out, _, _ = ours(x, enc, enc_pad, self_attn_mask=future)  # fairseq passes its future mask: accepted
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    state = {}
    steps = [ours(x[t : t + 1], enc, enc_pad, incremental_state=state)[0] for t in range(T)]
    torch.testing.assert_close(torch.cat(steps), ref, atol=1e-5, rtol=1e-4)
