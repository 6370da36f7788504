// The deny filter: a request whose path starts with the configured prefix gets a local 403.
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair,
} from "@solo-io/proxy-runtime";
import { FilterRoot } from "../../common/filter";

class Deny extends Context {
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    let prefix = this.root_context.getConfiguration();
    if (prefix == "") prefix = "/deny";
    const path = stream_context.headers.request.get(":path");
    if (path.startsWith(prefix)) {
      const headers: HeaderPair[] = [
        new HeaderPair(String.UTF8.encode("x-denied-by"), String.UTF8.encode("wasm")),
      ];
      send_local_response(403, "denied_by_wasm", String.UTF8.encode("denied by wasm: " + path + "\n"),
        headers, GrpcStatusValues.PermissionDenied);
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new FilterRoot<Deny>(context_id); }, "deny");
