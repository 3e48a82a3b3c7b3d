# Drops the optimizer.* tensors (SGD momentum, needed only by --resume) from a safetensors checkpoint; every other
# tensor keeps its bytes and the metadata is unchanged.
import json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, 'rb') as f:
    n = struct.unpack('<Q', f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
out_header, chunks, offset = {}, [], 0
for name, entry in header.items():
    if name == '__metadata__' or name.startswith('optimizer.'):
        continue
    begin, end = entry['data_offsets']
    chunks.append(data[begin:end])
    out_header[name] = dict(entry, data_offsets=[offset, offset + end - begin])
    offset += end - begin
out_header['__metadata__'] = header['__metadata__']
text = json.dumps(out_header, separators=(',', ':')).encode()
text += b' ' * (-len(text) % 8)
with open(dst, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(chunks))
