// The header filter: request and response headers, plugin configuration, properties and a tick timer.
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { FilterRoot } from "../../common/filter";
import { set_tick_period_milliseconds } from "@solo-io/proxy-runtime/runtime";
import { free } from "@solo-io/proxy-runtime/malloc";

// The SDK's get_property aborts on NOT_FOUND (a plaintext request has no source.principal): call the
// ABI directly and read a missing property as "".
// @ts-ignore: decorator
@external("env", "proxy_get_property")
declare function proxy_get_property(path: usize, path_size: usize, value_ptr: usize, value_size: usize): u32;

let ticks: u32 = 0;
const returned = new ArrayBuffer(8);  // the host writes the value's address and size here

function property(path: string): string {
  const name = String.UTF8.encode(path);
  const out = changetype<usize>(returned);
  if (proxy_get_property(changetype<usize>(name), name.byteLength, out, out + 4) != 0) return "";
  const data = load<u32>(out);
  const size = load<u32>(out + 4);
  if (size == 0) return "";
  const value = String.UTF8.decodeUnsafe(data, size);
  free(data);
  return value;
}

class HeadersRoot extends FilterRoot<Headers> {
  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size);
    set_tick_period_milliseconds(50);
    return true;
  }
  onTick(): void {
    ticks += 1;
  }
}

class Headers extends Context {
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const request = stream_context.headers.request;
    request.add("x-wasm-config", this.root_context.getConfiguration());
    request.add("x-wasm-principal", property("source.principal"));
    request.replace("x-wasm-replaced", "by-wasm");
    request.remove("x-wasm-remove-me");
    return FilterHeadersStatusValues.Continue;
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const response = stream_context.headers.response;
    response.add("x-wasm-filter", "headers");
    response.add("x-wasm-path", property("request.path"));
    response.add("x-wasm-status", response.get(":status"));
    response.add("x-wasm-ticks", ticks.toString());
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new HeadersRoot(context_id); }, "headers");
