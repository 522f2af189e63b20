"""save_quantized / load_quantized: bit-identical round trips, meta-device rebuild, version errors, and the
diffusers from_pretrained path."""
import json
import os

import pytest
import torch

import ditq
from ditq import QuantConfig
from ditq.io import HEADER_NAME, CheckpointError
from ditq.nn import QuantLinear
from tiny_models import dit_inputs, tiny_dit, tiny_dit_pipeline


def _quantized_dit(cfg=None, seed=0):
    """A quantized tiny DiT calibrated on the inputs of ``seed`` (same shapes, other scales per seed)."""
    t = tiny_dit()
    inp = dit_inputs(seed=seed)
    ditq.quantize(t, cfg or QuantConfig.preset("w4a8", group_size=32, progress=False), calib_fn=lambda m: m(**inp))
    return t, inp


def test_pipeline_round_trip_is_bit_identical(tmp_path):
    pipe = tiny_dit_pipeline()
    ditq.quantize(pipe, QuantConfig.preset("w8a8", progress=False),
                  calib_inputs=dict(class_labels=[1, 2], num_inference_steps=2))
    ditq.save_quantized(pipe, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "transformer", "vae"]
    assert json.load(open(tmp_path / "model_index.json"))["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert pipe.config["transformer"] == ("diffusers", "DiTTransformer2DModel")  # the live pipeline is intact
    loaded = ditq.load_quantized(str(tmp_path))
    assert type(loaded) is type(pipe)
    run = dict(class_labels=[3, 4], num_inference_steps=2, output_type="np")
    a = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = loaded(**run, generator=torch.Generator().manual_seed(0)).images
    assert (a == b).all()


def test_transformer_round_trip_meta_init_and_header(tmp_path, monkeypatch):
    t, inp = _quantized_dit()
    ditq.save_quantized(t, str(tmp_path))
    header = json.load(open(tmp_path / HEADER_NAME))
    assert header["layout_version"] == 1 and header["model_class"].endswith("DiTTransformer2DModel")
    assert header["quant_config"]["weight_bits"] == 4 and len(header["layers"]) == 14
    spec = header["layers"]["transformer_blocks.0.attn1.to_q"]
    assert spec["format"]["group_size"] == 32 and spec["act_scale"] == pytest.approx(
        float(t.transformer_blocks[0].attn1.to_q.act_scale))
    # No full-precision linear weight is materialized while loading: every nn.Linear parameter is created on
    # the meta device, so the only Linear weights with storage are the skipped layers' (filled from the file).
    created = []
    real_init = torch.nn.Linear.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        created.append(self.weight.device.type)
    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    loaded = ditq.load_quantized(str(tmp_path))
    assert created and set(created) == {"meta"}
    assert isinstance(loaded.transformer_blocks[1].ff.net[2], QuantLinear)
    assert not loaded.training
    assert torch.equal(t(**inp).sample, loaded(**inp).sample)


def test_bf16_model_round_trip(tmp_path):
    t, inp = _quantized_dit(QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False))
    t = t.to(torch.bfloat16)
    ditq.save_quantized(t, str(tmp_path))
    loaded = ditq.load_quantized(str(tmp_path))
    x = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inp.items()}
    assert loaded.pos_embed.pos_embed.dtype == torch.bfloat16
    assert torch.equal(t(**x).sample, loaded(**x).sample)


def test_other_layout_version_is_refused(tmp_path):
    t, _ = _quantized_dit()
    ditq.save_quantized(t, str(tmp_path))
    header = json.load(open(tmp_path / HEADER_NAME))
    header["layout_version"] = 2
    json.dump(header, open(tmp_path / HEADER_NAME, "w"))
    with pytest.raises(CheckpointError, match="version 2.*reads layout 'ditq-canonical' version 1"):
        ditq.load_quantized(str(tmp_path))


def test_save_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        ditq.save_quantized(tiny_dit(), str(tmp_path))
    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    ditq.quantize(m, QuantConfig(act_scheme="dynamic", progress=False))
    with pytest.raises(TypeError, match="needs a diffusers model"):
        ditq.save_quantized(m, str(tmp_path))
    with pytest.raises(CheckpointError, match="not a ditq checkpoint"):
        ditq.load_quantized(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a directory"):
        ditq.load_quantized(str(tmp_path / "missing"))
    t, _ = _quantized_dit()
    ditq.save_quantized(t, str(tmp_path / "t"))
    with pytest.raises(Exception, match="not available"):
        ditq.load_quantized(str(tmp_path / "t"), backend="cuda")


def test_registered_with_diffusers():
    from diffusers.quantizers import auto
    assert "ditq" in auto.AUTO_QUANTIZER_MAPPING and "ditq" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING


def test_diffusers_from_pretrained(tmp_path):
    pytest.importorskip("accelerate", reason="diffusers loads quantized models only with low_cpu_mem_usage, "
                                             "which needs accelerate (ditq.load_quantized does not)")
    from diffusers import DiTTransformer2DModel
    t, inp = _quantized_dit()
    ditq.save_quantized(t, str(tmp_path))
    loaded = DiTTransformer2DModel.from_pretrained(str(tmp_path))
    assert isinstance(loaded.transformer_blocks[0].attn1.to_q, QuantLinear)
    assert torch.equal(t(**inp).sample, loaded(**inp).sample)
    bf = DiTTransformer2DModel.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    assert bf.transformer_blocks[0].attn1.to_q.scales.dtype == torch.float32  # scales kept exact
    assert bf.transformer_blocks[0].attn1.to_q.bias.dtype == torch.bfloat16  # biases follow the dtype
    assert bf.proj_out_2.weight.dtype == torch.bfloat16  # and so do the layers left unquantized
    x = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inp.items()}
    assert bf(**x).sample.dtype == torch.bfloat16


def test_diffusers_from_pretrained_reproduces_the_saved_flux_bit_for_bit(tmp_path):
    """diffusers left its float tensors as views into the weights file, some at offsets not 64-byte aligned, where
    CPU kernels round differently: the tiny FLUX's output differed from the saved model's by 1.2e-7."""
    pytest.importorskip("accelerate", reason="diffusers loads quantized models only with low_cpu_mem_usage")
    from tiny_models import tiny_family
    model, inp = tiny_family("flux")
    ditq.quantize(model, QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False))
    ditq.save_quantized(model, str(tmp_path))
    loaded = type(model).from_pretrained(str(tmp_path))
    assert all(t.data_ptr() % 64 == 0 for t in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(**inp).sample, model(**inp).sample)


# ---- the obvious mistakes, each refused before anything is read or written, naming the argument ---------------

@pytest.fixture(scope="module")
def dynamic_dit():
    return _quantized_dit(QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False))


@pytest.mark.parametrize("path", [None, 5])
def test_a_path_that_is_not_a_path(dynamic_dit, path):
    t, _ = dynamic_dit
    with pytest.raises(TypeError, match="path must be a directory path .*, got "):
        ditq.save_quantized(t, path)
    with pytest.raises(TypeError, match="path must be a directory path .*, got "):
        ditq.load_quantized(path)
    with pytest.raises(ValueError, match="path is an empty string"):
        ditq.save_quantized(t, "")


def test_save_into_a_file_is_refused_and_a_pathlike_works(dynamic_dit, tmp_path):
    import pathlib
    t, inp = dynamic_dit
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="save_quantized: .*/f exists and is not a directory"):
        ditq.save_quantized(t, str(tmp_path / "f"))
    ditq.save_quantized(t, pathlib.Path(tmp_path / "ok"))
    with torch.no_grad():
        assert torch.equal(ditq.load_quantized(pathlib.Path(tmp_path / "ok"))(**inp).sample, t(**inp).sample)


@pytest.mark.parametrize("device, gpus, match", [
    ("cuda:7", 0, "device 'cuda:7': no CUDA GPU is visible here"),
    ("cuda", 0, "device 'cuda': no CUDA GPU is visible here"),
    (0, 0, "device 'cuda:0': no CUDA GPU is visible here"),
    ("cuda:2", 2, r"device 'cuda:2': only 2 CUDA device\(s\) are visible \(cuda:0 to cuda:1\)"),
    ("gpu", 0, "device 'gpu' is not a torch device"),
    ("mps", 0, r"device 'mps': this machine has no mps device \(torch.mps.is_available\(\) is False\); use 'cpu'$"),
    ("xpu:1", 2, r"device 'xpu:1': this machine has no xpu device .*; use 'cpu' or 'cuda'$"),
    ("hpu", 0, r"device 'hpu': this machine has no hpu device \(torch.hpu does not exist\)"),
], ids=["cuda7-no-gpu", "cuda-no-gpu", "index-no-gpu", "cuda2-of-2", "not-a-device", "mps", "xpu", "hpu"])
def test_a_device_this_machine_lacks_is_refused_before_reading(tmp_path, monkeypatch, device, gpus, match):
    """Checked first: the directory need not even hold a checkpoint (torch would fail only at the first tensor
    copy, with "Found no NVIDIA driver" or an invalid device ordinal; on mps / xpu with a RuntimeError or an
    AssertionError from deep inside torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)  # the same answer on a Mac
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.delattr(torch, "hpu", raising=False)
    with pytest.raises(ValueError, match=match):
        ditq.load_quantized(str(tmp_path), device=device)
    with pytest.raises(TypeError, match="device must be a torch.device, a str"):
        ditq.load_quantized(str(tmp_path), device=1.5)


def test_an_unknown_backend_name_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="backend must be None .* or one of torch, triton, cuda, cuda-emulated, "
                                         "auto, got 'cublas'"):
        ditq.load_quantized(str(tmp_path), backend="cublas")


def test_a_checkpoint_whose_backend_cannot_run_here_says_how_to_load_it(dynamic_dit, tmp_path, monkeypatch):
    """Quantized on a GPU with backend="cuda", loaded on a CPU: the error names the checkpoint's choice and the
    way out, which works (the weights on disk are canonical, for every backend)."""
    t, inp = dynamic_dit
    ditq.save_quantized(t, str(tmp_path))
    header = json.load(open(tmp_path / HEADER_NAME))
    header["quant_config"]["backend"] = "cuda"
    json.dump(header, open(tmp_path / HEADER_NAME, "w"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ditq.backends.BackendUnavailableError,
                       match="the checkpoint's QuantConfig names backend 'cuda': pass backend= to load_quantized"):
        ditq.load_quantized(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(ditq.load_quantized(str(tmp_path), backend="torch")(**inp).sample, t(**inp).sample)


def test_a_bare_transformer_is_not_saved_over_a_pipeline_checkpoint(dynamic_dit, tmp_path):
    """The directory would still load as the old pipeline (model_index.json decides), silently not this model."""
    t, _ = dynamic_dit
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a pipeline checkpoint .*save a bare transformer into a directory"):
        ditq.save_quantized(t, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model_index.json"]


@pytest.mark.parametrize("fail_at", ["weights", "header", "config"])
def test_an_interrupted_save_never_leaves_an_old_header_over_new_weights(tmp_path, monkeypatch, fail_at):
    """Saved over an older checkpoint of the same shapes, a save that stops early leaves the old checkpoint whole
    (stopped while writing) or a directory refused as not a checkpoint (stopped while moving files in): never
    the old header's activation scales with the new weights, which would load silently."""
    from ditq import io

    old, inp = _quantized_dit(QuantConfig.preset("w8a8", progress=False), seed=1)
    new, _ = _quantized_dit(QuantConfig.preset("w8a8", progress=False), seed=2)
    assert float(old.transformer_blocks[0].attn1.to_q.act_scale) != float(new.transformer_blocks[0].attn1.to_q.act_scale)
    ditq.save_quantized(old, str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == io.CONFIG_NAME:  # the weights are already in: the worst moment
            raise OSError("disk full")
        return real_replace(src, dst)

    real_open = open

    def open_(path, mode="r", *a, **k):
        if io.HEADER_NAME in os.path.basename(str(path)) and "w" in mode:  # writing the header: the last file
            raise OSError("disk full")
        return real_open(path, mode, *a, **k)

    if fail_at == "weights":
        monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    elif fail_at == "header":
        monkeypatch.setattr("builtins.open", open_)
    else:
        monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        ditq.save_quantized(new, str(tmp_path))
    monkeypatch.undo()
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    assert not leftovers
    if fail_at in ("weights", "header"):
        assert sorted(os.listdir(tmp_path)) == before
        with torch.no_grad():
            assert torch.equal(ditq.load_quantized(str(tmp_path))(**inp).sample, old(**inp).sample)
    else:
        with pytest.raises(CheckpointError, match="not a ditq checkpoint"):
            ditq.load_quantized(str(tmp_path))
    ditq.save_quantized(new, str(tmp_path))  # and a save that completes replaces it
    with torch.no_grad():
        assert torch.equal(ditq.load_quantized(str(tmp_path))(**inp).sample, new(**inp).sample)


@pytest.mark.parametrize("window", [None, 1000])  # the loader's default map window, and a reopen every few tensors
def test_a_loaded_model_does_not_depend_on_its_file(tmp_path, monkeypatch, window):
    """Every loaded tensor is a copy, none a view of the weights file's memory map: the loaded model equals the
    saved one bit for bit, and overwriting the file in place (every data byte) does not change it. A view would
    also keep the whole map resident."""
    from ditq import io

    if window is not None:
        monkeypatch.setattr(io, "_MAP_WINDOW_BYTES", window)
    t, inp = _quantized_dit(QuantConfig.preset("w8a8", progress=False), seed=1)
    ditq.save_quantized(t, str(tmp_path))
    path = tmp_path / io.WEIGHTS_NAME
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, JSON header, then the data
    header = json.loads(raw[8:start])
    aligned = [k for k, v in header.items() if k != "__metadata__" and (start + v["data_offsets"][0]) % 64 == 0]
    assert aligned, "no tensor sits 64-byte aligned in the file: the case this test is about does not arise"
    loaded = ditq.load_quantized(str(tmp_path))
    with torch.no_grad():
        before = loaded(**inp).sample.clone()
        assert torch.equal(before, t(**inp).sample)
    with open(path, "r+b") as f:  # in place: the same inode, as a map would see it
        f.seek(start)
        f.write(bytes(len(raw) - start))
    with torch.no_grad():
        assert torch.equal(loaded(**inp).sample, before)


@pytest.fixture(scope="module")
def bf16_pipeline(tmp_path_factory):
    """A quantized tiny DiT pipeline cast to bfloat16 after quantizing (``pipe.to(dtype)``), and its checkpoint."""
    pipe = tiny_dit_pipeline()
    ditq.quantize(pipe, QuantConfig.preset("w8a8", act_scheme="dynamic", progress=False))
    pipe = pipe.to(torch.bfloat16)
    path = str(tmp_path_factory.mktemp("pipe"))
    ditq.save_quantized(pipe, path)
    return pipe, path


@pytest.fixture
def pipeline_checkpoint(bf16_pipeline):
    return bf16_pipeline[1]


def test_a_bf16_pipeline_loads_in_bf16_and_samples_the_same(bf16_pipeline):
    """diffusers alone would load the VAE in float32 beside the bf16 transformer: the first call failed with
    "Input type (c10::BFloat16) and bias type (float) should be the same"."""
    import warnings
    pipe, path = bf16_pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the dtype is passed by the name this diffusers takes
        loaded = ditq.load_quantized(path, progress=False)
    assert loaded.vae.dtype == loaded.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    run = dict(class_labels=[3, 4], num_inference_steps=2, output_type="pt")
    a = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = loaded(**run, generator=torch.Generator().manual_seed(0)).images
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    as_f32 = ditq.load_quantized(path, progress=False, dtype=torch.float32)  # asked for: every component
    assert as_f32.vae.dtype == as_f32.transformer.pos_embed.proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="give dtype or torch_dtype .*, not both"):
        ditq.load_quantized(path, dtype=torch.float32, torch_dtype=torch.float32)


def test_a_bare_transformer_takes_dtype_as_diffusers_names_it(dynamic_dit, tmp_path):
    t, _ = dynamic_dit
    ditq.save_quantized(t, str(tmp_path))
    assert ditq.load_quantized(str(tmp_path), dtype=torch.bfloat16).pos_embed.proj.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"takes only torch_dtype \(or dtype, its newer name\) besides device and "
                                        r"backend for it, got \['variant'\]"):
        ditq.load_quantized(str(tmp_path), variant="fp16")


def test_dtype_keeps_the_classes_fp32_modules_and_casts_without_diffusers_warning(dynamic_dit, tmp_path, capfd,
                                                                                  monkeypatch):
    """A load with a dtype leaves what the model class keeps in float32 (``_keep_in_fp32_modules``) in float32, as
    diffusers' from_pretrained does, and says nothing: ModelMixin.to warned on every such cast."""
    t, inp = dynamic_dit
    ditq.save_quantized(t, str(tmp_path))
    capfd.readouterr()
    monkeypatch.setattr(type(t), "_keep_in_fp32_modules", ["pos_embed"])
    bf = ditq.load_quantized(str(tmp_path), dtype=torch.bfloat16)
    assert capfd.readouterr().err == ""
    assert bf.pos_embed.proj.weight.dtype == torch.float32 and bf.proj_out_1.weight.dtype == torch.bfloat16
    quantized = [m for m in bf.modules() if isinstance(m, QuantLinear)]
    assert quantized and all(m.scales.dtype == torch.float32 for m in quantized)
    monkeypatch.setattr(type(t), "_keep_in_fp32_modules", None)
    assert ditq.load_quantized(str(tmp_path), dtype=torch.bfloat16).pos_embed.proj.weight.dtype == torch.bfloat16


def test_progress_off_loads_a_pipeline_silently_and_restores_diffusers_bars(pipeline_checkpoint, capfd):
    """diffusers' "Loading pipeline components" bar follows ``progress``; its global switch is left as it was."""
    from diffusers.utils import logging as dlogging
    was = dlogging.is_progress_bar_enabled()
    try:
        dlogging.enable_progress_bar()
        capfd.readouterr()
        ditq.load_quantized(pipeline_checkpoint, progress=False)
        assert capfd.readouterr().err == ""
        assert dlogging.is_progress_bar_enabled()
        ditq.load_quantized(pipeline_checkpoint)  # the default shows diffusers' bar, as diffusers does
        assert "Loading pipeline components" in capfd.readouterr().err
        dlogging.disable_progress_bar()  # a caller's choice stays
        ditq.load_quantized(pipeline_checkpoint, progress=True)
        assert capfd.readouterr().err == "" and not dlogging.is_progress_bar_enabled()
        with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):
            ditq.load_quantized(pipeline_checkpoint, progress="no")
    finally:
        (dlogging.enable_progress_bar if was else dlogging.disable_progress_bar)()
