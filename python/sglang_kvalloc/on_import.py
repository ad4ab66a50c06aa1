"""Upstream modules a plain server never imports, where importing one changes the server
(Mooncake's registers a Prometheus counter): the plugin's hooks on them are applied when
upstream imports them (`early_plugins`, `upstream.plugin.apply_on_import`). Standard
library only: the bootstrap .pth loads it."""

ON_IMPORT_MODULES: tuple[str, ...] = ("sglang.srt.disaggregation.mooncake.conn",)
