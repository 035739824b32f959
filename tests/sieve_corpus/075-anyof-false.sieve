# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if anyof (false, not true) {
  fileinto "yes";
} else {
  fileinto "no";
}
