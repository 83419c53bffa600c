"""The ComfyUI adapters: what the pack needs of a host MODEL (its family, schedule, layers), the hooks
that run residuals inside its UNet, the training glue and the LAG engine. The node classes in nodes/
call these; the math below them is host-free, in perres_core/."""
