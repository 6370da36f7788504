// The body filter: buffers the request body and upper-cases it; prefixes the buffered response body.
export * from "@solo-io/proxy-runtime/proxy";
import {
  Context, registerRootContext, FilterHeadersStatusValues, FilterDataStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import { FilterRoot } from "../../common/filter";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// The SDK 0.1.8 binds its setter to the wrong import name, so declare the ABI's own.
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: u32, start: u32, length: u32, data: usize, size: usize): u32;

function set_buffer(typ: BufferTypeValues, start: u32, length: u32, data: ArrayBuffer): void {
  proxy_set_buffer_bytes(typ as u32, start, length, changetype<usize>(data), data.byteLength);
}

class Body extends Context {
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.remove("content-length");
    return FilterHeadersStatusValues.Continue;
  }
  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    const body = get_buffer_bytes(BufferTypeValues.HttpRequestBody, 0, body_buffer_length as u32);
    const upper = String.UTF8.encode(String.UTF8.decode(body).toUpperCase());
    set_buffer(BufferTypeValues.HttpRequestBody, 0, body_buffer_length as u32, upper);
    return FilterDataStatusValues.Continue;
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.remove("content-length");
    return FilterHeadersStatusValues.Continue;
  }
  onResponseBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    const prefix = String.UTF8.encode("wasm saw " + body_buffer_length.toString() + " bytes: ");
    set_buffer(BufferTypeValues.HttpResponseBody, 0, 0, prefix);
    return FilterDataStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new FilterRoot<Body>(context_id); }, "body");
