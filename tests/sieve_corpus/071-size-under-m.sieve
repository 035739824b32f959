# envelope: from=alice@example.org to=bob+lists@example.com message=messages/large.eml
require ["fileinto"];
if size :under 1M {
  fileinto "yes";
} else {
  fileinto "no";
}
