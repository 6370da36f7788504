// The looping filter: every request spins forever (until the host's fuel runs out), or on /grow
// allocates until the host's memory limit stops it.
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { FilterRoot } from "../../common/filter";

let spins: u64 = 0;
const hoard: ArrayBuffer[] = [];

class Loop extends Context {
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.startsWith("/grow")) {
      while (true) hoard.push(new ArrayBuffer(1 << 20));
    }
    while (spins != u64.MAX_VALUE) spins += 1 + (spins & 1);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new FilterRoot<Loop>(context_id); }, "loop");
