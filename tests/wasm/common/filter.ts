// What every test filter shares: a root context that makes one `T` (the filter's Context) per stream.
import { RootContext, Context } from "@solo-io/proxy-runtime";

export class FilterRoot<T extends Context> extends RootContext {
  createContext(context_id: u32): Context {
    return instantiate<T>(context_id, this);
  }
}
