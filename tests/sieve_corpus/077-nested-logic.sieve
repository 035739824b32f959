# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if not anyof (allof (true, false), not true) {
  fileinto "yes";
} else {
  fileinto "no";
}
