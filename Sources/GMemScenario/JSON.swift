/// A JSON value. Objects keep their key order (scenario output is stable) and
/// numbers keep their source text (no precision is lost before a field says what
/// it wants: a UInt64, a signed offset, ...).
public indirect enum JSON: Hashable, Sendable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSON])
    case object(JSONObject)

    public static func int<T: BinaryInteger>(_ v: T) -> JSON { .number(String(v)) }

    public subscript(key: String) -> JSON? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    /// Compact serialization, as `--json` prints it.
    public var rendered: String {
        var out = ""
        render(into: &out)
        return out
    }

    func render(into out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let n): out += n
        case .string(let s): JSON.quote(s, into: &out)
        case .array(let a):
            out += "["
            for (i, v) in a.enumerated() {
                if i > 0 { out += ", " }
                v.render(into: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            for (i, k) in o.keys.enumerated() {
                if i > 0 { out += ", " }
                JSON.quote(k, into: &out)
                out += ": "
                o[k]!.render(into: &out)
            }
            out += "}"
        }
    }

    static func quote(_ s: String, into out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        out += "\""
    }
}

/// A JSON object with its keys in source order.
public struct JSONObject: Hashable, Sendable {
    public private(set) var keys: [String] = []
    private var values: [String: JSON] = [:]
    /// The line each key was read on, for error messages.
    public private(set) var lines: [String: Int] = [:]

    public init() {}

    public init(_ pairs: KeyValuePairs<String, JSON>) {
        for (k, v) in pairs { self[k] = v }
    }

    public subscript(key: String) -> JSON? {
        get { values[key] }
        set {
            if values[key] == nil, newValue != nil { keys.append(key) }
            if newValue == nil { keys.removeAll { $0 == key } }
            values[key] = newValue
        }
    }

    mutating func setLine(_ line: Int, for key: String) { lines[key] = line }

    public static func == (a: JSONObject, b: JSONObject) -> Bool { a.keys == b.keys && a.values == b.values }
    public func hash(into h: inout Hasher) {
        h.combine(keys)
        for k in keys { h.combine(values[k]) }
    }
}

/// Where and why a JSON text is not valid.
public struct JSONSyntaxError: Error, Hashable, Sendable, CustomStringConvertible {
    public var line: Int
    public var column: Int
    public var message: String
    public var description: String { "line \(line), column \(column): \(message)" }
}

/// A strict RFC 8259 parser with positions in its errors. Nesting is bounded so no
/// input can exhaust the stack.
public struct JSONParser {
    private let bytes: [UInt8]
    private var i = 0
    private var line = 1
    private var lineStart = 0
    private var depth = 0
    static let maxDepth = 200

    public static func parse(_ text: String) throws(JSONSyntaxError) -> JSON {
        var p = JSONParser(bytes: Array(text.utf8))
        p.skipSpace()
        let v = try p.value()
        p.skipSpace()
        if p.i < p.bytes.count { throw p.error("unexpected text after the JSON value") }
        return v
    }

    private init(bytes: [UInt8]) { self.bytes = bytes }

    private func error(_ message: String) -> JSONSyntaxError {
        JSONSyntaxError(line: line, column: i - lineStart + 1, message: message)
    }

    private mutating func skipSpace() {
        while i < bytes.count {
            switch bytes[i] {
            case 0x20, 0x09, 0x0D: i += 1
            case 0x0A:
                i += 1
                line += 1
                lineStart = i
            default: return
            }
        }
    }

    private var peek: UInt8? { i < bytes.count ? bytes[i] : nil }

    private mutating func value() throws(JSONSyntaxError) -> JSON {
        guard let c = peek else { throw error("unexpected end of input, expected a value") }
        switch c {
        case UInt8(ascii: "{"): return try object()
        case UInt8(ascii: "["): return try array()
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw error("unexpected character '\(Character(Unicode.Scalar(c)))', expected a value")
        }
    }

    private mutating func literal(_ word: String) throws(JSONSyntaxError) {
        for b in word.utf8 {
            guard peek == b else { throw error("invalid literal, expected '\(word)'") }
            i += 1
        }
    }

    private mutating func number() throws(JSONSyntaxError) -> JSON {
        let start = i
        if peek == UInt8(ascii: "-") { i += 1 }
        guard let d = peek, d >= 0x30 && d <= 0x39 else { throw error("invalid number") }
        if d == 0x30 {
            i += 1
        } else {
            while let c = peek, c >= 0x30 && c <= 0x39 { i += 1 }
        }
        if peek == UInt8(ascii: ".") {
            i += 1
            guard let c = peek, c >= 0x30 && c <= 0x39 else { throw error("invalid number: digits expected after '.'") }
            while let c = peek, c >= 0x30 && c <= 0x39 { i += 1 }
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            i += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { i += 1 }
            guard let c = peek, c >= 0x30 && c <= 0x39 else { throw error("invalid number: exponent digits expected") }
            while let c = peek, c >= 0x30 && c <= 0x39 { i += 1 }
        }
        return .number(String(decoding: bytes[start..<i], as: UTF8.self))
    }

    private mutating func string() throws(JSONSyntaxError) -> String {
        i += 1  // opening quote
        var scalars = String.UnicodeScalarView()
        var run = i
        func flush(_ p: inout JSONParser, _ scalars: inout String.UnicodeScalarView, to end: Int) {
            scalars.append(contentsOf: String(decoding: p.bytes[run..<end], as: UTF8.self).unicodeScalars)
        }
        while true {
            guard let c = peek else { throw error("unterminated string") }
            if c == UInt8(ascii: "\"") {
                flush(&self, &scalars, to: i)
                i += 1
                return String(scalars)
            }
            if c < 0x20 { throw error("control character in string") }
            if c == UInt8(ascii: "\\") {
                flush(&self, &scalars, to: i)
                i += 1
                guard let e = peek else { throw error("unterminated escape") }
                i += 1
                switch e {
                case UInt8(ascii: "\""): scalars.append("\"")
                case UInt8(ascii: "\\"): scalars.append("\\")
                case UInt8(ascii: "/"): scalars.append("/")
                case UInt8(ascii: "b"): scalars.append("\u{8}")
                case UInt8(ascii: "f"): scalars.append("\u{c}")
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "u"):
                    var code = try hex4()
                    if (0xD800..<0xDC00).contains(code) {
                        guard peek == UInt8(ascii: "\\"), i + 1 < bytes.count, bytes[i + 1] == UInt8(ascii: "u") else {
                            throw error("unpaired surrogate in \\u escape")
                        }
                        i += 2
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else { throw error("invalid surrogate pair") }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let s = Unicode.Scalar(code) else { throw error("invalid \\u escape") }
                    scalars.append(s)
                default: throw error("invalid escape '\\\(Character(Unicode.Scalar(e)))'")
                }
                run = i
                continue
            }
            i += 1
        }
    }

    private mutating func hex4() throws(JSONSyntaxError) -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            guard let c = peek, let d = Self.hexDigit(c) else { throw error("invalid \\u escape") }
            v = v << 4 | UInt32(d)
            i += 1
        }
        return v
    }

    static func hexDigit(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x41...0x46: c - 0x41 + 10
        case 0x61...0x66: c - 0x61 + 10
        default: nil
        }
    }

    private mutating func array() throws(JSONSyntaxError) -> JSON {
        depth += 1
        defer { depth -= 1 }
        if depth > Self.maxDepth { throw error("nesting deeper than \(Self.maxDepth)") }
        i += 1
        var items: [JSON] = []
        skipSpace()
        if peek == UInt8(ascii: "]") {
            i += 1
            return .array(items)
        }
        while true {
            skipSpace()
            items.append(try value())
            skipSpace()
            switch peek {
            case UInt8(ascii: ","): i += 1
            case UInt8(ascii: "]"):
                i += 1
                return .array(items)
            default: throw error("expected ',' or ']' in array")
            }
        }
    }

    private mutating func object() throws(JSONSyntaxError) -> JSON {
        depth += 1
        defer { depth -= 1 }
        if depth > Self.maxDepth { throw error("nesting deeper than \(Self.maxDepth)") }
        i += 1
        var obj = JSONObject()
        skipSpace()
        if peek == UInt8(ascii: "}") {
            i += 1
            return .object(obj)
        }
        while true {
            skipSpace()
            guard peek == UInt8(ascii: "\"") else { throw error("expected a string key in object") }
            let keyLine = line
            let key = try string()
            if obj[key] != nil { throw error("duplicate key \"\(key)\"") }
            skipSpace()
            guard peek == UInt8(ascii: ":") else { throw error("expected ':' after key \"\(key)\"") }
            i += 1
            skipSpace()
            obj[key] = try value()
            obj.setLine(keyLine, for: key)
            skipSpace()
            switch peek {
            case UInt8(ascii: ","): i += 1
            case UInt8(ascii: "}"):
                i += 1
                return .object(obj)
            default: throw error("expected ',' or '}' in object")
            }
        }
    }
}
