-- Specs for luatron.json: exact round trips, stable output, strict decoding with positions.
local json = require "luatron.json"

local function msg_of(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error, got none")
  return tostring(e)
end

describe("luatron.json encode", function()
  it("writes scalars", function()
    assert.are.equal("null", json.encode(nil))
    assert.are.equal("null", json.encode(json.null))
    assert.are.equal("true", json.encode(true))
    assert.are.equal("false", json.encode(false))
    assert.are.equal("42", json.encode(42))
    assert.are.equal("-7", json.encode(-7))
    assert.are.equal("9223372036854775807", json.encode(math.maxinteger))
    assert.are.equal("-9223372036854775808", json.encode(math.mininteger))
    assert.are.equal("1.5", json.encode(1.5))
    assert.are.equal("3.0", json.encode(3.0))
    assert.are.equal("-0.0", json.encode(-0.0))
    assert.are.equal("0.1", json.encode(0.1))
    assert.are.equal("1e+300", json.encode(1e300))
    assert.are.equal('"hi"', json.encode("hi"))
  end)

  it("escapes strings and keeps UTF-8", function()
    assert.are.equal([["a\"b\\c\nd\te\r\b\f"]], json.encode("a\"b\\c\nd\te\r\b\f"))
    assert.are.equal([["\u0001\u001f"]], json.encode("\1\31"))
    assert.are.equal('"é😀/"', json.encode("é😀/"))
  end)

  it("sorts object keys so output is stable", function()
    assert.are.equal('{"a":1,"b":{"c":[1,2],"d":null},"z":"x"}',
      json.encode({ z = "x", b = { d = json.null, c = { 1, 2 } }, a = 1 }))
  end)

  it("tells arrays from objects, with marks for empty ones", function()
    assert.are.equal("{}", json.encode({}))
    assert.are.equal("[]", json.encode(json.array({})))
    assert.are.equal("{}", json.encode(json.object({})))
    assert.are.equal("[1,[2,[3]]]", json.encode({ 1, { 2, { 3 } } }))
    assert.are.equal('[null,2]', json.encode({ json.null, 2 }))
  end)

  it("pretty-prints with indent", function()
    assert.are.equal('{\n  "a": [\n    1,\n    2\n  ],\n  "b": {}\n}', json.encode({ a = { 1, 2 }, b = {} }, { indent = 2 }))
  end)

  it("refuses what JSON cannot hold, naming where", function()
    assert.are.equal("json.encode: cannot encode NaN at $.loss", msg_of(json.encode, { loss = 0 / 0 }))
    assert.are.equal("json.encode: cannot encode inf at $[2]", msg_of(json.encode, { 1, math.huge }))
    assert.are.equal("json.encode: cannot encode -inf at $", msg_of(json.encode, -math.huge))
    assert.are.equal("json.encode: array is sparse (has holes; use json.null for missing values) at $.a",
      msg_of(json.encode, { a = { 1, nil, 3 } }))
    assert.are.equal("json.encode: table mixes string keys and array indices at $",
      msg_of(json.encode, { 1, a = 2 }))
    assert.are.equal("json.encode: cannot encode a value of type function at $.f",
      msg_of(json.encode, { f = print }))
    assert.are.equal("json.encode: table key 1.5 (a number) is neither a string nor an array index at $",
      msg_of(json.encode, { [1.5] = 1 }))
    local t = {}
    t.self = t
    assert.are.equal("json.encode: circular reference at $.self", msg_of(json.encode, t))
    assert.are.equal("json.encode: invalid UTF-8 in string at $.s", msg_of(json.encode, { s = "\xff" }))
  end)
end)

describe("luatron.json decode", function()
  it("reads every JSON type", function()
    local v = json.decode(' {"a": [1, 2.0, -3e2, "x", true, false, null], "b": {}, "c": [] } ')
    assert.are.equal(1, v.a[1])
    assert.are.equal("integer", math.type(v.a[1]))
    assert.are.equal("float", math.type(v.a[2]))
    assert.are.equal(-300.0, v.a[3])
    assert.are.equal("x", v.a[4])
    assert.is_true(v.a[5])
    assert.is_false(v.a[6])
    assert.are.equal(json.null, v.a[7])
    assert.is_true(json.is_array(v.a))
    assert.is_true(json.is_array(v.c))
    assert.is_false(json.is_array(v.b))
    assert.are.equal('{"a":[1,2.0,-300.0,"x",true,false,null],"b":{},"c":[]}', json.encode(v))
  end)

  it("decodes escapes, including surrogate pairs", function()
    assert.are.equal("é😀\n\"/\0", json.decode([["\u00e9\ud83d\ude00\n\"\/\u0000"]]))
  end)

  it("keeps integers beyond 2^53 exact and turns overflowing integers into floats", function()
    assert.are.equal(9007199254740993, json.decode("9007199254740993"))
    assert.are.equal(math.mininteger, json.decode("-9223372036854775808"))
    assert.are.equal("float", math.type(json.decode("92233720368547758080")))
  end)

  it("round-trips numbers exactly", function()
    for _, x in ipairs({ 0.1, 1 / 3, 2 / 3, 1e-310, 5e-324, 2 ^ 53, 2 ^ 63, 123456789.123, -1.5e-7,
      1.7976931348623157e308, 3.0, -0.0, 6.02214076e23, 0.30000000000000004 }) do
      local back = json.decode(json.encode(x))
      assert.are.equal(x, back)
      assert.are.equal("float", math.type(back))
    end
    for _, n in ipairs({ 0, 1, -1, 1000000007, math.maxinteger, math.mininteger }) do
      local back = json.decode(json.encode(n))
      assert.are.equal(n, back)
      assert.are.equal("integer", math.type(back))
    end
    assert.are.equal(1 / -math.huge, json.decode("-0.0")) -- -0.0
    assert.are.equal("-0.0", json.encode(json.decode("-0.0")))
  end)

  it("round-trips nested values", function()
    local v = { step = 12, loss = 2.3456789012345678, lr = 3e-4, tags = { "a", "b" }, nested = { x = { 1.5, -2 } },
      empty = json.array({}), text = "line1\nline2 ✓" }
    local text = json.encode(v)
    assert.are.same(v, json.decode(text))
    assert.are.equal(text, json.encode(json.decode(text)))
    assert.are.same(v, json.decode(json.encode(v, { indent = 4 })))
  end)

  it("rejects malformed input with line, column and byte", function()
    local cases = {
      { "[1,]", "json.decode: trailing comma in array at line 1 column 4 (byte 4)" },
      { '{"a":1,}', "json.decode: trailing comma in object at line 1 column 8 (byte 8)" },
      { '{"a":1,"a":2}', "json.decode: duplicate key 'a' in object at line 1 column 8 (byte 8)" },
      { "01", "json.decode: leading zeros are not allowed in numbers at line 1 column 1 (byte 1)" },
      { "1.", "json.decode: expected a digit after the decimal point at line 1 column 3 (byte 3)" },
      { "1e", "json.decode: expected a digit in the exponent at line 1 column 3 (byte 3)" },
      { "1e999", "json.decode: number out of range: 1e999 at line 1 column 1 (byte 1)" },
      { "[1 2]", "json.decode: expected ',' or ']' in array, got '2' at line 1 column 4 (byte 4)" },
      { '{"a" 1}', "json.decode: expected ':' after object key, got '1' at line 1 column 6 (byte 6)" },
      { "{a:1}", "json.decode: expected a string key in object, got 'a' at line 1 column 2 (byte 2)" },
      { '"abc', "json.decode: unterminated string at line 1 column 1 (byte 1)" },
      { '"\\x"', "json.decode: invalid escape '\\x' at line 1 column 2 (byte 2)" },
      { '"\\u12"', "json.decode: invalid \\u escape (expected 4 hex digits) at line 1 column 2 (byte 2)" },
      { '"\\ud800"', "json.decode: unpaired high surrogate in \\u escape at line 1 column 2 (byte 2)" },
      { '"\\udc00"', "json.decode: unpaired low surrogate in \\u escape at line 1 column 2 (byte 2)" },
      { '"a\tb"', "json.decode: raw control character 0x09 in string (escape it) at line 1 column 3 (byte 3)" },
      { '"\xff"', "json.decode: invalid UTF-8 in string at line 1 column 2 (byte 2)" },
      { "nul", "json.decode: unexpected 'n' (expected a value) at line 1 column 1 (byte 1)" },
      { "NaN", "json.decode: unexpected 'N' (expected a value) at line 1 column 1 (byte 1)" },
      { "", "json.decode: unexpected end of input (expected a value) at line 1 column 1 (byte 1)" },
      { "[1", "json.decode: expected ',' or ']' in array, got end of input at line 1 column 3 (byte 3)" },
      { "1 2", "json.decode: unexpected '2' after the JSON value at line 1 column 3 (byte 3)" },
      { "// c\n1", "json.decode: unexpected '/' (expected a value) at line 1 column 1 (byte 1)" },
      { '{\n  "a": 1,\n  "b": x\n}', "json.decode: unexpected 'x' (expected a value) at line 3 column 8 (byte 20)" },
    }
    for _, c in ipairs(cases) do
      assert.are.equal(c[2], msg_of(json.decode, c[1]))
    end
    assert.are.equal("json.decode: nesting deeper than 512 at line 1 column 514 (byte 514)",
      msg_of(json.decode, string.rep("[", 600)))
    assert.truthy(msg_of(json.decode, 42):find("json.decode: expected a string, got number", 1, true))
  end)

  it("decodes metrics JSON lines one by one", function()
    local lines = {}
    for i = 1, 3 do lines[i] = json.encode({ iteration = i, loss = 10 / i }) end
    local text = table.concat(lines, "\n") .. "\n"
    local n = 0
    for line in text:gmatch("[^\n]+") do
      n = n + 1
      local rec = json.decode(line)
      assert.are.equal(n, rec.iteration)
      assert.are.equal(10 / n, rec.loss)
    end
    assert.are.equal(3, n)
  end)
end)
