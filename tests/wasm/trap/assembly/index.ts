// The trapping filter: every request traps (a wasm `unreachable`), or on /trap/exit throws, which
// the SDK turns into a critical log and proc_exit(255).
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { FilterRoot } from "../../common/filter";

class Trap extends Context {
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.includes("exit")) {
      throw new Error("the trap filter throws on " + path);
    }
    unreachable();
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new FilterRoot<Trap>(context_id); }, "trap");
