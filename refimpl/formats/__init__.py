"""Formats: the official checkpoint (safetensors bytes, then tensor names) and text (tokenizer, chat).

`checkpoint` knows bytes and dtypes, not model names; `weights` knows names, not bytes, and
turns a checkpoint folder into a `Model` (`load`); `inspect` summarizes any checkpoint and scans
its values for NaN/Inf; `tokenizer` maps text to ids; `encoding` is the DeepSeek V4 chat format;
`files` is how every file is written (atomically, never onto a device, a FIFO or a folder) and
every small file is read (with a size limit, JSON strictly); `sigbus` turns a mapped file truncated
while in use into one error line.
"""
