"""Register "ditq" as a diffusers quantization method, so that after ``import ditq``::

    DiTTransformer2DModel.from_pretrained(saved_dir / "transformer")

loads a checkpoint written by :func:`ditq.save_quantized` (its ``config.json`` carries
``"quantization_config": {"quant_method": "ditq", ...}``).

What this relies on (diffusers 0.42; none of it is a documented extension point):

* the module-level dicts ``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` and
  ``AUTO_QUANTIZATION_CONFIG_MAPPING`` (internal): ``DiffusersAutoQuantizer`` looks the method up there at load
  time, so adding a key is enough;
* ``ModelMixin.from_pretrained`` reading ``quantization_config.quant_method.value`` (we give a ``str`` subclass with
  ``.value``, since the ``QuantizationMethod`` enum cannot be extended) and calling the ``DiffusersQuantizer`` hooks
  ``_process_model_before_weight_loading`` / ``check_if_quantized_param`` / ``create_quantized_param`` /
  ``_process_model_after_weight_loading``;
* diffusers refuses quantized loading without ``low_cpu_mem_usage``, which needs the ``accelerate`` package:
  without it this path raises diffusers' own error and :func:`ditq.load_quantized` (which needs neither) is the
  way to load.

If diffusers changes these internals, registration is skipped with a warning and ``ditq.load_quantized`` keeps
working.
"""
from __future__ import annotations

import os
import warnings

from .nn import QuantLinear


class _Method(str):
    """A quant_method string with the ``.value`` diffusers reads from its enum members."""

    @property
    def value(self) -> str:
        return str(self)


def _build():
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    from . import io

    class DitqDiffusersConfig(QuantizationConfigMixin):
        """The ditq header (``ditq.io``) as a diffusers quantization config. It is validated once the quantizer
        knows the checkpoint's file (``maybe_update_loaded_keys``), so that errors name it."""

        def __init__(self, **header):
            header.pop("quant_method", None)
            self.quant_method = _Method(io.QUANT_METHOD)
            self.header = header

        def to_dict(self):
            return {"quant_method": str(self.quant_method), **self.header}

        def to_diff_dict(self):
            return self.to_dict()

    class DitqDiffusersQuantizer(DiffusersQuantizer):
        """Loads pre-quantized ditq checkpoints (quantizing while loading is ``ditq.quantize``'s job: it needs
        calibration).

        Checks, each a :class:`ditq.io.CheckpointError` naming the file: the header (in ``config.json``) and the
        weights file's tensors (every layer's qweight / scales / bias / act_scale present, with the format's
        dtypes and shapes) before any weight is loaded; the values when each layer's tensors are installed."""

        requires_calibration = True
        use_keep_in_fp32_modules = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._where = "quantization_config in config.json"  # until the checkpoint's files are known
            self._weights = "the weights file"
            self._checked = False
            self._loaded = set()  # (layer, tensor) pairs create_quantized_param installed

        def validate_environment(self, *args, **kwargs):
            return None

        def _check_header(self):
            if not self._checked:
                io.check_header(self.quantization_config.header, where=self._where)
                self._checked = True

        def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
            # The first hook that sees the files: check everything here, before the model is touched.
            files = list(checkpoint_files or [])
            if files:
                self._where = os.path.join(os.path.dirname(files[0]), "config.json")
                self._weights = files[0] if len(files) == 1 else os.path.dirname(files[0])
            self._check_header()
            if len(files) == 1 and str(files[0]).endswith(".safetensors"):
                io.check_tensors(self.quantization_config.header, io.read_weights_index(files[0]), files[0])
            else:
                io.check_tensors(self.quantization_config.header, set(loaded_keys), self._weights)
            return loaded_keys

        def _process_model_before_weight_loading(self, model, **kwargs):
            self._check_header()  # when a diffusers version skips maybe_update_loaded_keys
            header = self.quantization_config.header
            # the config's backend request ("auto" is resolved by each layer on the device it lands on)
            io.install_quant_linears(model, header, header["quant_config"]["backend"], self._where)
            return model

        def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs):
            module_name, _, tensor = param_name.rpartition(".")
            try:
                return isinstance(model.get_submodule(module_name), QuantLinear)
            except AttributeError:
                return False

        def check_quantized_param_shape(self, *args, **kwargs):
            return True  # shapes are validated by check_tensors and QuantLinear.load_canonical

        def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                                   unexpected_keys=None, **kwargs):
            # Take the tensor as saved: diffusers may already have cast float tensors (scales) to torch_dtype.
            module_name, _, tensor = param_name.rpartition(".")
            value = state_dict[param_name].to(target_device)
            layer = model.get_submodule(module_name)
            if tensor == "bias" and param_value.is_floating_point():
                value = param_value.to(target_device)  # bias follows the requested dtype like any bias
            layer._buffers[tensor] = value
            self._loaded.add((module_name, tensor))

        def _process_model_after_weight_loading(self, model, **kwargs):
            # diffusers leaves CPU tensors as views into the weights file's memory map; one at an offset that is
            # not 64-byte aligned makes some CPU kernels take another (differently rounding) path, so the loaded
            # model would not reproduce the saved one bit for bit (as ditq.load_quantized's own copies do).
            for t in list(model.parameters()) + list(model.buffers()):
                if t.device.type == "cpu" and t.data_ptr() % 64:
                    t.data = t.data.clone()
            for name, m in model.named_modules():
                if not isinstance(m, QuantLinear):
                    continue
                need = ["qweight", "scales"] + (["bias"] if m.bias is not None else []) + \
                    (["act_scale"] if m.act_scale is not None else [])
                missing = [t for t in need if (name, t) not in self._loaded]
                if missing:  # a placeholder would stay: meta tensors, or an act_scale of 1 (NaN images)
                    raise io.CheckpointError(f"{self._weights}: layer {name!r} has no {missing[0]!r} tensor "
                                             f"({name}.{missing[0]} was not loaded)")
                t = m.canonical()
                try:
                    m.load_canonical(t["qweight"], t["scales"], t.get("bias"), t.get("act_scale"))
                except (ValueError, TypeError) as e:
                    raise io.CheckpointError(f"{self._weights}: layer {name!r}: {e}") from e
            try:  # timestep-grouped activation scales: from the header, with their transformer pre-hook
                from . import timestep_groups
                timestep_groups.restore(model, self.quantization_config.header)
            except (ValueError, TypeError, KeyError) as e:
                raise io.CheckpointError(f"{self._where}: invalid timestep-grouped activation scales: {e}") from e
            io.restore_fusion(model, self.quantization_config.header)
            io.restore_quant_record(model, self.quantization_config.header)
            return model

        @property
        def is_serializable(self):
            return False  # use ditq.save_quantized

        @property
        def is_trainable(self):
            return False

    return DitqDiffusersConfig, DitqDiffusersQuantizer


def register() -> bool:
    """Add "ditq" to diffusers' quantizer mappings; True on success (idempotent)."""
    try:
        from diffusers.quantizers import auto
        config_cls, quantizer_cls = _build()
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING["ditq"] = config_cls
        auto.AUTO_QUANTIZER_MAPPING["ditq"] = quantizer_cls
        return True
    except Exception as e:  # an internal moved: the ditq.load_quantized path does not depend on it
        warnings.warn(f"ditq could not register with diffusers' quantizers ({type(e).__name__}: {e}); "
                      f"load checkpoints with ditq.load_quantized")
        return False


def is_registered() -> bool:
    try:
        from diffusers.quantizers import auto
    except ImportError:
        return False
    return "ditq" in auto.AUTO_QUANTIZER_MAPPING


__all__ = ["register", "is_registered"]
